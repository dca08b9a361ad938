"""A tiny conv + BN segmenter that stands in for HRNet where the loop, not the network, is tested."""
from flax import nnx
import jax


class TinySegmenter(nnx.Module):
  """conv3x3 -> BN (torch momentum 0.1) -> ReLU -> conv1x1: (N, H, W, 3) -> (N, H, W, C)."""

  def __init__(self, model_config, rngs):
    width = model_config.width
    self.conv = nnx.Conv(3, width, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
    self.head = nnx.Conv(width, model_config.num_classes, (1, 1), rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.bn(self.conv(x))))
