"""A tiny conv + BN segmenter that stands in for HRNet where the loop, not the network, is tested."""
from flax import nnx
import jax
import jax.numpy as jnp


class TinySegmenter(nnx.Module):
  """conv3x3 -> BN (torch momentum 0.1) -> ReLU -> conv1x1: (N, H, W, 3) -> (N, H, W, C)."""

  def __init__(self, model_config, rngs):
    width = model_config.width
    self.conv = nnx.Conv(3, width, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
    self.head = nnx.Conv(width, model_config.num_classes, (1, 1), rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.bn(self.conv(x))))


class TinySiAN(nnx.Module):
  """A tiny stand-in SiAN (`sian.build(model_config, rngs)`): (N, H, W, 3) uint8 -> (grade logits
  (N, K), lesion logits (N, H, W, 4)).

  side: one 3x3 conv (frozen under `sian.trainable`); main: conv 3x3 stride 4 -> BN -> ReLU -> global
  mean, concatenated with the max-pooled sigmoid lesion maps, -> fc.
  """

  def __init__(self, model_config, rngs):
    self.side = nnx.Conv(3, model_config.side.num_classes, (3, 3), rngs=rngs)
    self.conv = nnx.Conv(3, 8, (3, 3), strides=4, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-3, rngs=rngs)
    self.fc = nnx.Linear(8 + model_config.side.num_classes, model_config.num_classes, rngs=rngs)

  def __call__(self, pixels):
    x = pixels.astype(jnp.float32) / 255
    lesions = jax.lax.stop_gradient(self.side(x))
    features = jax.nn.relu(self.bn(self.conv(x))).mean((1, 2))
    attention = jax.nn.sigmoid(lesions).max((1, 2))
    return self.fc(jnp.concatenate([features, attention], -1)), lesions
