"""Building blocks with PyTorch conventions, in NHWC: conv, BatchNorm, sequential, bilinear resize.

Parameter names follow PyTorch (`weight`, `bias`, `running_mean`, `running_var`) so that module paths
and leaf names spell the mmsegmentation state_dict keys; only the layouts differ (conv kernels are HWIO).
"""
from collections.abc import Callable, Sequence
import functools
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
    x, weight = x.astype(self.dtype), self.weight[...].astype(self.dtype)
    if weight.shape[:2] == (1, 1) and self.padding == (0, 0):
      # A 1x1 conv is a matmul over channels; XLA:CPU runs it ~3x faster as dot_general.
      y = pointwise(x[:, ::self.stride, ::self.stride], weight[0, 0])
    else:
      y = jax.lax.conv_general_dilated(
          x, weight, (self.stride, self.stride), [(p, p) for p in self.padding],
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
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
    if self.use_running_average:
      y, _ = _standardize(x, self.running_mean[...], self.running_var[...], self.weight[...],
                          self.bias[...], self.eps)
      return y.astype(self.dtype)
    count = math.prod(x.shape[:-1])
    if count < 2:
      raise ValueError(f'BatchNorm in train mode needs more than 1 value per channel, got input '
                       f'shape {x.shape} (as torch.nn.BatchNorm2d)')
    y, mean, var = batch_norm_train(x, self.weight[...], self.bias[...], self.eps)
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    m = self.momentum
    # set_value, not `[...] =`: under tracing flax formats a costly message for each item store.
    self.running_mean.set_value((1 - m) * self.running_mean[...] + m * mean)
    self.running_var.set_value((1 - m) * self.running_var[...] + m * var * (count / (count - 1)))
    return y.astype(self.dtype)


def _standardize(x, mean, var, weight, bias, eps):
  """(float32 (x - mean) / sqrt(var + eps) * weight + bias, 1 / sqrt(var + eps)); x (..., C)."""
  inv = jax.lax.rsqrt(var + eps)
  return (x.astype(jnp.float32) - mean) * inv * weight + bias, inv


def _batch_norm_forward(x, weight, bias, eps):
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = xf.mean(axes)
  var = jnp.square(xf - mean).mean(axes)
  y, inv = _standardize(xf, mean, var, weight, bias, eps)
  return y, mean, var, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, weight, bias, eps):
  """(..., C) -> (y float32 (..., C), batch mean (C,), biased batch variance (C,)), over all but C.

  Differentiable in `y` only: the closed-form backward of torch's native batch norm (two channel
  reductions, one elementwise pass) in place of autodiff through the mean and variance, which made the
  W18 train step 15-25% slower and its XLA compile 30-40% longer on a CPU. The statistics' cotangents
  are dropped; callers pass them through `stop_gradient`.
  """
  return _batch_norm_forward(x, weight, bias, eps)[:3]


def _batch_norm_train_fwd(x, weight, bias, eps):
  y, mean, var, inv = _batch_norm_forward(x, weight, bias, eps)
  return (y, mean, var), (x, mean, inv, weight)


def _batch_norm_train_bwd(eps, residuals, cotangents):
  del eps
  x, mean, inv, weight = residuals
  g = cotangents[0].astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  count = math.prod(x.shape[:-1])
  x_hat = (x.astype(jnp.float32) - mean) * inv
  g_bias = g.sum(axes)
  g_weight = (g * x_hat).sum(axes)
  g_x = (weight * inv) * (g - (g_bias + x_hat * g_weight) / count)
  return g_x.astype(x.dtype), g_weight, g_bias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


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


@jax.custom_vjp
def pointwise(x, weight):
  """(..., C_in) @ (C_in, C_out) -> (..., C_out): a 1x1 conv as one dot_general over the channel axis.

  Its backward is autodiff's, but for C_in < C_out the kernel gradient x^T g transposes x, the smaller
  operand, behind an optimization barrier: otherwise XLA:CPU transposes g, the larger one, inside the
  loop fusion that computes g (the BatchNorm backward), 14 ms each for HRNet's 64 -> 256 convs, and
  the W18 train step is 14% slower.
  """
  return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, weight):
  return pointwise(x, weight), (x, weight)


def _pointwise_bwd(residuals, g):
  x, weight = residuals
  g_x = jax.lax.dot_general(g, weight, (((g.ndim - 1,), (1,)), ((), ())))
  x_t = x.reshape(-1, x.shape[-1]).T  # (C_in, pixels)
  if weight.shape[0] < weight.shape[1]:
    x_t = jax.lax.optimization_barrier(x_t)
  g_w = jax.lax.dot_general(x_t, g.reshape(-1, g.shape[-1]), (((1,), (0,)), ((), ())))
  return g_x.astype(x.dtype), g_w.astype(weight.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def linear_taps(in_size: int, out_size: int):
  """torch `upsample_bilinear2d` (align_corners=False) along one axis: (i0, i1, w0, w1), (out_size,).

  Output i reads input src = max(scale (i + 0.5) - 0.5, 0) as w0 x[i0] + w1 x[i1], i0 = floor(src),
  i1 = min(i0 + 1, in - 1), w1 = src - i0, w0 = 1 - w1; scale = in / out in float32 and src rounded
  once to float32 (torch's fused multiply-add), so that the weights are torch's bit for bit (the
  interpolated values then differ from torch's by float32 rounding, ~1 ulp).
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0).astype(np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  return i0, i1, np.float32(1) - w1, w1


def _resize_axis(x, axis: int, size: int):
  """Two-tap linear interpolation of `x` along `axis` to `size` (torch's weights; a gather, no matmul).

  The gradient is the transposed interpolation as one contraction with the dense (in, out) weights:
  the transpose of a gather is a scatter-add, which XLA:CPU runs an order of magnitude slower.
  """
  if x.shape[axis] == size:
    return x
  i0, i1, w0, w1 = linear_taps(x.shape[axis], size)

  def interpolate(x):
    shape = [1] * x.ndim
    shape[axis] = size
    a, b = (jnp.asarray(w.reshape(shape), x.dtype) for w in (w0, w1))
    return jnp.take(x, i0, axis=axis) * a + jnp.take(x, i1, axis=axis) * b

  matrix = np.zeros((x.shape[axis], size), np.float32)  # y = x @ matrix along `axis`
  np.add.at(matrix, (i0, np.arange(size)), w0)
  np.add.at(matrix, (i1, np.arange(size)), w1)

  @jax.custom_vjp
  def resize(x):
    return interpolate(x)

  def backward(_, g):
    g = jnp.moveaxis(g, axis, -1) @ jnp.asarray(matrix.T, g.dtype)
    return (jnp.moveaxis(g, -1, axis),)

  resize.defvjp(lambda x: (interpolate(x), None), backward)
  return resize(x)


def resize_bilinear(x, size: Sequence[int]):
  """torch bilinear interpolation, align_corners=False, no antialiasing: (N, H, W, C) -> (N, h, w, C).

  Separable two-tap interpolation with torch's float32 weights, width first (as torch's kernel): the
  work is a few multiply-adds per output value, where `jax.image.resize` contracts dense (in, out)
  weight matrices.
  """
  size = tuple(int(s) for s in size)
  if x.shape[1:3] == size:
    return x
  return _resize_axis(_resize_axis(x, 2, size[1]), 1, size[0])


def resize_bilinear_rows(x, size: Sequence[int], start, rows: int):
  """Rows [start, start + rows) of `resize_bilinear(x, size)`, computing only those: (N, rows, w, C).

  `start` may be traced (0 <= start <= h - rows); the same taps and weights as the full resize.
  """
  h, w = (int(s) for s in size)
  i0, i1, w0, w1 = (jax.lax.dynamic_slice_in_dim(jnp.asarray(t), start, rows)
                    for t in linear_taps(x.shape[1], h))
  if x.shape[1] == h:  # identity taps along the rows
    i0, i1, w0, w1 = jnp.arange(rows) + start, jnp.arange(rows) + start, jnp.ones(rows), jnp.zeros(rows)
  top, bottom = (_resize_axis(jnp.take(x, i, axis=1), 2, w) for i in (i0, i1))
  w0, w1 = (v.astype(x.dtype)[None, :, None, None] for v in (w0, w1))
  return top * w0 + bottom * w1


class Upsample(nnx.Module):
  """mmseg `Upsample(scale_factor, mode='bilinear', align_corners=False)` for an integer factor."""

  def __init__(self, scale_factor: int):
    self.scale_factor = scale_factor

  def __call__(self, x):
    return resize_bilinear(x, (x.shape[1] * self.scale_factor, x.shape[2] * self.scale_factor))
