"""A2U, affinity-aware up/downsampling (Dai, Lu and Shen, CVPR 2021; dongdong93/a2u_matting), NHWC.

`InterChannelUpDown` with the released settings (up kernel s = 3, encode kernel k = 6, shared U/V,
1 group, d = 1): from the feature x (N, H, W, C) at the high resolution,
  U, V = 1x1 convs C -> 1 of adaptive-avg-pooled (k x k) x: one k x k kernel each per sample;
  a = sum_c GN-LReLU(x * U)_c GN-LReLU(x * V)_c / sqrt(C), the stride-2 (padding 2) convs of every
      channel with U and V: an (N, H/2, W/2) second-order affinity map;
  P_u, P_d = 1x1 convs C -> 4 s^2 of the global mean of x;
  up kernels = softmax(sigmoid(pixel_shuffle(a P_u))) over s^2 taps at (H, W),
  down kernels = softmax(a P_d) over (2 s)^2 taps at (H/2, W/2).
Downsampling reassembles 6x6 windows starting 2 pixels before each even pixel; upsampling is the
CARAFE reassembly with s x s windows. GroupNorm uses gcd(C, 32) groups (the code's 32 needs C % 32 == 0,
which HRNet's 48-multiples are not). Odd maps are zero-padded bottom/right.
"""
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from m2mrf_jax import layers
from m2mrf_jax.resampling.windows import pad_to_even, pixel_shuffle, reassemble_up, windows


def _cells(n: int, size: int):
  """(size, n) averaging matrix of `F.adaptive_avg_pool2d`: cell i spans
  [floor(i n / size), ceil((i + 1) n / size))."""
  m = np.zeros((size, n), np.float32)
  for i in range(size):
    start, end = i * n // size, -(-(i + 1) * n // size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, size: int):
  """`F.adaptive_avg_pool2d(x, size)`: (N, H, W, C) -> (N, size, size, C)."""
  _, h, w, _ = x.shape
  return jnp.einsum('ih,nhwc,jw->nijc', _cells(h, size), x, _cells(w, size))


class GroupNorm(nnx.Module):
  """`nn.GroupNorm(groups, C)` (eps 1e-5, affine) on (N, H, W, C)."""

  def __init__(self, num_features: int, groups: int, eps: float = 1e-5):
    self.groups = groups
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

  def __call__(self, x):
    n, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
    mean = xf.mean((1, 2, 4), keepdims=True)
    var = jnp.square(xf - mean).mean((1, 2, 4), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
    return (y * self.weight[...] + self.bias[...]).astype(x.dtype)


def _conv1x1(c_in, c_out, dtype, rngs):
  return layers.Conv2d(c_in, c_out, 1, use_bias=True, dtype=dtype, rngs=rngs)


class A2UKernels(nnx.Module):
  """x (N, H, W, C), H and W even, and its `windows(x, k, 2, ((k - 1) // 2,) * 2)` patches
  -> down kernels (N, H/2, W/2, 4 s^2), up kernels (N, H, W, s^2)."""

  def __init__(self, channels: int, up_kernel: int = 3, encode_kernel: int = 6, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.s = up_kernel
    self.k = encode_kernel
    groups = math.gcd(channels, 32)
    self.bnu = GroupNorm(channels, groups)
    self.bnv = GroupNorm(channels, groups)
    self.bconv_UP = _conv1x1(channels, 4 * up_kernel ** 2, dtype, rngs)
    self.bconv_DP = _conv1x1(channels, 4 * up_kernel ** 2, dtype, rngs)
    self.bconv_U = _conv1x1(channels, 1, dtype, rngs)
    self.bconv_V = _conv1x1(channels, 1, dtype, rngs)

  def __call__(self, x, patches):
    n, _, _, c = x.shape
    mean = x.mean((1, 2), keepdims=True)
    p_u = self.bconv_UP(mean).reshape(n, -1)  # (N, 4 s^2)
    p_d = self.bconv_DP(mean).reshape(n, -1)
    pooled = adaptive_avg_pool(x, self.k)
    u = self.bconv_U(pooled).reshape(n, -1)  # (N, k^2)
    v = self.bconv_V(pooled).reshape(n, -1)
    leaky = lambda y: jax.nn.leaky_relu(y, 0.01)
    xu = leaky(self.bnu(jnp.einsum('nhwtc,nt->nhwc', patches, u)))
    xv = leaky(self.bnv(jnp.einsum('nhwtc,nt->nhwc', patches, v)))
    affinity = (xu * xv).sum(-1) / math.sqrt(c)  # (N, H/2, W/2)
    up = pixel_shuffle(affinity[..., None] * p_u[:, None, None], 2).astype(jnp.float32)
    up = jax.nn.softmax(jax.nn.sigmoid(up), axis=-1)
    down = jax.nn.softmax((affinity[..., None] * p_d[:, None, None]).astype(jnp.float32), axis=-1)
    return down, up


class A2UDown(nnx.Module):
  """(N, H, W, C) -> ((N, ceil(H/2), ceil(W/2), C), guide (up kernels, (H, W))) for `A2UUp`.

  The 6x6 windows from 2 pixels before each even pixel are those of the encoder's stride-2 convs
  (padding 2) on an even map, so one set of patches serves both.
  """

  def __init__(self, channels: int, up_kernel: int = 3, encode_kernel: int = 6, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if encode_kernel != 2 * up_kernel:
      raise ValueError(f'A2U encode kernel {encode_kernel} must be twice the up kernel {up_kernel}')
    self.kernel_size = 2 * up_kernel
    self.kernels = A2UKernels(channels, up_kernel, encode_kernel, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    size = x.shape[1:3]
    x = pad_to_even(x)
    k = self.kernel_size
    patches = windows(x, k, 2, ((k - 1) // 2, (k - 1) // 2))  # (N, H/2, W/2, k^2, C)
    down, up = self.kernels(x, patches)
    y = jnp.einsum('nhwtc,nhwt->nhwc', patches, down.astype(x.dtype))
    return y, (up, size)


class A2UUp(nnx.Module):
  """x2 upsampling with the up kernels of the paired `A2UDown`: (N, h, w, C) -> (N, H, W, C)."""

  def __init__(self, up_kernel: int = 3):
    self.up_kernel = up_kernel

  def __call__(self, x, guide):
    up, (h, w) = guide
    return reassemble_up(x, up, self.up_kernel)[:, :h, :w]
