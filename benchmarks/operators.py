"""The paper's operator comparison (Table 2): parameters, forward GFLOPs and images/s of every row.

  python benchmarks/operators.py --size=1024 --rows=all --repeats=3 [--width=48] [--batch=1]

One row per (down, up) pair of Table 2, built from its config (configs/ddr_*.py), jitted in eval mode:
parameters, XLA FLOPs per image (cost_analysis of the compiled forward), compile time, images/s on
this machine's first device, beside the paper's Param(M) and FPS (one GPU, 1024 x 1024 DDR input).
The ratio column (images/s relative to the StrideConv / Bilinear row when it is timed) is what compares
across machines; the paper's FPS ratio to 11.31 is printed beside it.
"""
import importlib
import os
import sys

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from benchmarks.compiled import compile_forward, median_seconds  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position

# config (configs/ddr_<name>.py) -> (Table 2 Downsample / Upsample, Param(M), FPS).
TABLE_2 = {
    'base': ('StrideConv / Bilinear', 65.85, 11.31),
    'maxpool_bilinear': ('MaxPool / Bilinear', 59.45, 11.88),
    'maxpool_unpool': ('MaxPool / Unpooling', 59.45, 11.62),
    'lip_bilinear': ('LIP / Bilinear', 75.44, 6.80),
    'carafe_bilinear': ('CARAFE / Bilinear', 66.30, 9.24),
    'strideconv_carafe': ('StrideConv / CARAFE', 72.12, 10.26),
    'strideconv_deconv': ('StrideConv / Deconv', 73.12, 10.86),
    'indexnet': ('IndexNet / IndexNet', 70.33, 10.75),
    'carafepp': ('CARAFE++ / CARAFE++', 72.57, 8.69),
    'a2u': ('A2U / A2U', 66.51, 3.97),
    'a': ('M2MRF(one-step) / (one-step)', 69.93, 9.21),
    'b': ('M2MRF(one-step) / (cascade)', 67.15, 8.54),
    'c': ('M2MRF(cascade) / (one-step)', 70.30, 8.49),
    'd': ('M2MRF(cascade) / (cascade)', 67.52, 8.01),
}

_SIZE = flags.DEFINE_integer('size', 1024, 'Square input size in pixels (the paper: DDR 1024).')
_WIDTH = flags.DEFINE_integer('width', 48, 'HRNetV2 width: 18, 32 or 48.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Images per forward.')
_ROWS = flags.DEFINE_list('rows', ['all'], f'Rows to time ("all" or some of {list(TABLE_2)}).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed forwards per row (median reported).')


def measure(name, x):
  """(parameters, GFLOPs per image, compile s, images/s) of the jitted eval forward of one row."""
  config = importlib.import_module(f'configs.ddr_{name}').get_config().model
  config.width = _WIDTH.value
  model = models.build(config, nnx.Rngs(0))
  model.eval()
  params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  run, compile_s, flops = compile_forward(model, x)
  run()
  return params, flops / 1e9, compile_s, x.shape[0] / median_seconds(run, _REPEATS.value)


def main(argv):
  del argv
  rows = list(TABLE_2) if _ROWS.value == ['all'] else _ROWS.value
  unknown = [r for r in rows if r not in TABLE_2]
  if unknown:
    raise app.UsageError(f'--rows: unknown {unknown}; choose from {list(TABLE_2)}')
  x = jnp.asarray(np.random.RandomState(0).randn(_BATCH.value, _SIZE.value, _SIZE.value, 3),
                  jnp.float32)
  device = jax.devices()[0]
  print(f'{device.platform} {device.device_kind}, {os.cpu_count()} CPUs; HRNetV2-W{_WIDTH.value}, '
        f'{_SIZE.value}x{_SIZE.value}, batch {_BATCH.value}, median of {_REPEATS.value}; paper: '
        f'W48, 1024x1024, one GPU')
  print(f'{"row (config ddr_*)":20}{"Downsample / Upsample":31}{"params":>12}{"paper M":>9}'
        f'{"GFLOPs":>9}{"compile s":>10}{"img/s":>9}{"ratio":>7}{"paper FPS":>10}{"ratio":>7}')
  base_rate = None
  for name in rows:
    title, paper_params, paper_fps = TABLE_2[name]
    params, gflops, compile_s, rate = measure(name, x)
    if name == 'base':
      base_rate = rate
    ratio = f'{rate / base_rate:7.2f}' if base_rate else f'{"-":>7}'
    print(f'{name:20}{title:31}{params / 1e6:12.2f}{paper_params:9.2f}{gflops:9.1f}'
          f'{compile_s:10.1f}{rate:9.3f}{ratio}{paper_fps:10.2f}{paper_fps / 11.31:7.2f}', flush=True)


if __name__ == '__main__':
  app.run(main)
