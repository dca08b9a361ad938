"""Building blocks with PyTorch conventions, in NHWC: conv, BatchNorm, sequential, bilinear resize.

Parameter names follow PyTorch (`weight`, `bias`, `running_mean`, `running_var`) so that module paths
and leaf names spell the mmsegmentation state_dict keys; only the layouts differ (conv kernels are HWIO).
"""
from collections.abc import Callable, Sequence
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, tuple[int, ...]], jax.Array]


_BLOCK = 1 << 16


def blocked_random(key, shape, distribution, scale=1.0):
  """`scale` times standard normal or U(-1, 1) float32 values of `shape`, in power-of-two blocks.

  Eager initialisation compiles the sampler once per block size (a handful) rather than once per
  parameter shape, which dominates model construction time on CPU. Same values eager or traced.
  """
  size = math.prod(shape)
  block = min(_BLOCK, max(1024, 1 << (size - 1).bit_length()))
  if distribution == 'normal':
    draw = lambda k: jax.random.normal(k, (block,), jnp.float32) * scale
  else:
    draw = lambda k: jax.random.uniform(k, (block,), jnp.float32, -1.0, 1.0) * scale
  n = -(-size // block)
  if isinstance(key, jax.core.Tracer):  # one vectorised draw: same values, short trace
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    return jax.vmap(draw)(keys).reshape(-1)[:size].reshape(shape)
  parts = [np.asarray(draw(jax.random.fold_in(key, i))) for i in range(n)]
  return jnp.asarray(np.concatenate(parts)[:size].reshape(shape))


class KeyStream:
  """`rngs.params()` for model construction: one key drawn from `rngs`, then `fold_in(key, i)`.

  Drawing every parameter key from an `nnx.Rngs` updates its counter Variable each time, which
  is slow to trace under `nnx.eval_shape` / `jit`; this stream keeps the counter in Python.
  """

  def __init__(self, rngs: nnx.Rngs):
    self.key = rngs.params()
    self.count = 0

  def params(self):
    self.count += 1
    return jax.random.fold_in(self.key, self.count)


def kaiming_normal_fan_out(key, shape):
  """mmcv `kaiming_init` (normal, fan_out, relu) of an HWIO kernel: std sqrt(2 / (kh kw out))."""
  fan_out = math.prod(shape[:-2]) * shape[-1]
  return blocked_random(key, shape, 'normal', math.sqrt(2.0 / fan_out))


def xavier_uniform(key, shape, fan_in, fan_out):
  """mmcv `xavier_init(distribution='uniform')`: U(+-sqrt(6 / (fan_in + fan_out)))."""
  return blocked_random(key, shape, 'uniform', math.sqrt(6.0 / (fan_in + fan_out)))


def xavier_uniform_hwio(key, shape):
  """`xavier_uniform` of an HWIO kernel."""
  receptive = math.prod(shape[:-2])
  return xavier_uniform(key, shape, receptive * shape[-2], receptive * shape[-1])


def normal_001(key, shape):
  """mmcv `normal_init(std=0.01)`: the classifier's weights."""
  return blocked_random(key, shape, 'normal', 0.01)


def _pair(value):
  return (value, value) if isinstance(value, int) else tuple(value)


class Conv2d(nnx.Module):
  """torch.nn.Conv2d on NHWC inputs with an HWIO `weight` and explicit symmetric padding.

  `kernel_size` and `padding` are an int or an (h, w) pair, as in torch (e.g. Inception's 1x7).
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
               padding: int = 0, use_bias: bool = False, *, kernel_init: Initializer = kaiming_normal_fan_out,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride = stride
    self.padding = _pair(padding)
    self.dtype = dtype
    shape = (*_pair(kernel_size), in_channels, out_channels)
    self.weight = nnx.Param(kernel_init(rngs.params(), shape))
    self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if use_bias else None

  def __call__(self, x):
    """(N, H, W, C_in) -> (N, floor((H + 2p_h - k_h) / s) + 1, ..., C_out) in the compute dtype."""
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.weight[...].astype(self.dtype), (self.stride, self.stride),
        [(p, p) for p in self.padding], dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class BatchNorm(nnx.Module):
  """torch.nn.BatchNorm2d over the last axis: momentum 0.1, eps 1e-5, unbiased running variance.

  `model.train()` / `model.eval()` flip `use_running_average`. Statistics are computed in float32
  over every axis but the last, i.e. over the global batch under jit (SyncBN).
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5,
               dtype=jnp.float32):
    self.momentum = momentum
    self.eps = eps
    self.dtype = dtype
    self.use_running_average = False
    self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x):
    """(..., C) -> (..., C) in the compute dtype; updates the running statistics in train mode."""
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.running_mean[...], self.running_var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[:-1])
      if count < 2:
        raise ValueError(f'BatchNorm in train mode needs more than 1 value per channel, got input '
                         f'shape {x.shape} (as torch.nn.BatchNorm2d)')
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      m = self.momentum
      # set_value, not `[...] =`: under tracing flax formats a costly message for each item store.
      self.running_mean.set_value((1 - m) * self.running_mean[...] + m * mean)
      self.running_var.set_value((1 - m) * self.running_var[...] + m * var * (count / (count - 1)))
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
    return y.astype(self.dtype)


class Sequential(nnx.Module):
  """torch.nn.Sequential: layers are attributes named '0', '1', ... (or given names), called in order."""

  def __init__(self, *layers, names: Sequence[str] | None = None):
    names = tuple(str(i) for i in range(len(layers))) if names is None else tuple(names)
    if len(names) != len(layers):
      raise ValueError(f'Sequential got {len(layers)} layers and {len(names)} names')
    self.names = names
    for name, layer in zip(names, layers):
      setattr(self, name, layer)

  def __getitem__(self, key):
    return getattr(self, str(key))

  def __len__(self):
    return len(self.names)

  def __iter__(self):
    return (getattr(self, name) for name in self.names)

  def __call__(self, x):
    for layer in self:
      x = layer(x)
    return x


def resize_bilinear(x, size: Sequence[int]):
  """torch bilinear interpolation, align_corners=False, no antialiasing: (N, H, W, C) -> (N, h, w, C)."""
  size = tuple(int(s) for s in size)
  if x.shape[1:3] == size:
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), 'bilinear', antialias=False)


class Upsample(nnx.Module):
  """mmseg `Upsample(scale_factor, mode='bilinear', align_corners=False)` for an integer factor."""

  def __init__(self, scale_factor: int):
    self.scale_factor = scale_factor

  def __call__(self, x):
    return resize_bilinear(x, (x.shape[1] * self.scale_factor, x.shape[2] * self.scale_factor))
