"""`python -m m2mrf_jax.main` with a tiny conv + BN segmenter in place of HRNet (multi-process tests).

Everything else is the real job: the flags, `jax.distributed`, the grain pipeline, the jitted step
over the device mesh, orbax checkpoints, evaluation and the logs. HRNet-W18 would spend minutes of a
2-core machine compiling in every process; the network is tested elsewhere.

  python -m tests.multiprocess_job --config=configs/demo.py --workdir=DIR [main's flags]
"""
from absl import app
from flax import nnx
import jax

from m2mrf_jax import main
from m2mrf_jax import models


class TinySegmenter(nnx.Module):
  """conv3x3 -> BN (torch momentum 0.1) -> ReLU -> conv1x1: (N, H, W, 3) -> (N, H, W, C)."""

  def __init__(self, model_config, rngs):
    width = model_config.width
    self.conv = nnx.Conv(3, width, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
    self.head = nnx.Conv(width, model_config.num_classes, (1, 1), rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.bn(self.conv(x))))


if __name__ == '__main__':
  models.build = TinySegmenter
  app.run(main.main, flags_parser=main.parse_flags)
