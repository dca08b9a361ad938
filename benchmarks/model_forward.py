"""Forward time per image of each variant: jitted JAX model (eval) vs the PyTorch statement, + XLA FLOPs.

  python benchmarks/model_forward.py --width=48 --size=512 --variants=base,a,b,c,d [--batch=1]

Prints one row per variant: parameters, XLA FLOPs per image (cost_analysis of the compiled forward),
JAX compile time, JAX and PyTorch median forward time per image (eval mode, float32, this machine).
"""
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
from configs.common import model_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import hrnet  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position

_WIDTH = flags.DEFINE_integer('width', 48, 'HRNetV2 width: 18, 32 or 48.')
_SIZE = flags.DEFINE_integer('size', 512, 'Square input size in pixels.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Images per forward.')
_VARIANTS = flags.DEFINE_list('variants', list(hrnet.VARIANTS), 'Variants to time.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed forwards per model (median reported).')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time tests/torch_reference.py.')


def time_jax(variant, x):
  """(parameters, FLOPs per image, compile s, forward s per image) of the jitted eval forward."""
  model = models.build(model_config(variant, _WIDTH.value), nnx.Rngs(0))
  model.eval()
  params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  run, compile_s, flops = compile_forward(model, x)
  run()
  return params, flops, compile_s, median_seconds(run, _REPEATS.value) / x.shape[0]


def time_torch(variant, x):
  """Forward seconds per image of the PyTorch statement (eval, no_grad), or None without it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
    import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'PyTorch statement unavailable ({e}); JAX only')
    return None
  model = torch_reference.build_torch_model(variant, _WIDTH.value, 4).eval()
  xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    model(xt)
    seconds = median_seconds(lambda: model(xt), _REPEATS.value)
  return seconds / x.shape[0]


def main(argv):
  del argv
  x = jnp.asarray(np.random.RandomState(0).randn(_BATCH.value, _SIZE.value, _SIZE.value, 3),
                  jnp.float32)
  print(f'device {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; width {_WIDTH.value}, '
        f'{_SIZE.value}x{_SIZE.value}, batch {_BATCH.value}, median of {_REPEATS.value}')
  header = (f'{"variant":8}{"params":>13}{"GFLOPs/img":>12}{"compile s":>11}'
            f'{"JAX s/img":>11}{"torch s/img":>13}')
  print(header)
  for variant in _VARIANTS.value:
    params, flops, compile_s, jax_s = time_jax(variant, x)
    torch_s = time_torch(variant, x) if _TORCH.value else None
    torch_text = f'{torch_s:13.3f}' if torch_s is not None else f'{"-":>13}'
    print(f'{variant:8}{params:13,d}{flops / 1e9:12.1f}{compile_s:11.1f}{jax_s:11.3f}{torch_text}',
          flush=True)


if __name__ == '__main__':
  app.run(main)
