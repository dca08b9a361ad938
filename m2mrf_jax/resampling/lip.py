"""LIP, local importance-based pooling (Gao, Wang and Wu, ICCV 2019; sebgao/LIP), NHWC.

lip(x) = sum_3x3(x * exp(logit)) / sum_3x3(exp(logit)) over 3x3 windows, stride 2, zero padding 1
(`F.avg_pool2d` ratio: the window counts cancel). The logit is LIP-ResNet's bottleneck logit module:
1x1 C -> 128, IN, ReLU, 3x3 128 -> 128, IN, ReLU, 1x1 128 -> C (zero-initialised), IN, 12 sigmoid.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from m2mrf_jax import layers

BOTTLENECK_WIDTH = 128
COEFF = 12.0


class InstanceNorm(nnx.Module):
  """`nn.InstanceNorm2d(C, affine=True)`: per-sample, per-channel statistics over H, W; eps 1e-5."""

  def __init__(self, num_features: int, eps: float = 1e-5):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = xf.mean((1, 2), keepdims=True)
    var = jnp.square(xf - mean).mean((1, 2), keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
    return y.astype(x.dtype)


def _zeros(key, shape):
  del key
  return jnp.zeros(shape, jnp.float32)


def sum_pool(x):
  """3x3 window sums, stride 2, zero padding 1: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C)."""
  # A NumPy (constant) init value: lax recognises the sum monoid and can differentiate it under jit.
  return jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


def lip2d(x, logit):
  """LIP pooling of x with importance exp(logit): (N, H, W, C) twice -> (N, ceil(H/2), ceil(W/2), C)."""
  weight = jnp.exp(logit)
  return sum_pool(x * weight) / sum_pool(weight)


class LIP(nnx.Module):
  """(N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C): `lip2d(x, logit(x))`."""

  def __init__(self, channels: int, width: int = BOTTLENECK_WIDTH, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    conv = dict(dtype=dtype, rngs=rngs)
    self.conv1 = layers.Conv2d(channels, width, 1, **conv)
    self.bn1 = InstanceNorm(width)
    self.conv2 = layers.Conv2d(width, width, 3, padding=1, **conv)
    self.bn2 = InstanceNorm(width)
    self.conv3 = layers.Conv2d(width, channels, 1, kernel_init=_zeros, **conv)
    self.bn3 = InstanceNorm(channels)

  def logit(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    return jax.nn.sigmoid(self.bn3(self.conv3(y))) * COEFF

  def __call__(self, x):
    return lip2d(x, self.logit(x).astype(x.dtype))
