"""CARAFE (Wang et al., ICCV 2019) and the CARAFE++ downsampler (TPAMI 2021), NHWC.

Both predict a softmax-normalised reassembly kernel per output pixel from the input (channel compressor
1x1 -> content encoder conv) and take a kernel-weighted sum of a k x k input neighbourhood.
Initialisation as mmcv `CARAFEPack`: xavier-uniform convs, the encoder N(0, 0.001), zero biases.
The channel compressor has no bias here (mmcv's has one): the reading under which the paper's three
CARAFE counts (66.30M down, 72.12M up, 72.57M both) all hold.
"""
from flax import nnx
import jax
import jax.numpy as jnp

from m2mrf_jax import layers
from m2mrf_jax.resampling.windows import pixel_shuffle, reassemble_down, reassemble_up


def _normal_0001(key, shape):
  return layers.blocked_random(key, shape, 'normal', 0.001)


class CARAFE(nnx.Module):
  """mmcv `CARAFEPack(channels, scale)`: (N, h, w, C) -> (N, h s, w s, C).

  compressor 1x1 C -> C_m (no bias), encoder k_enc x k_enc C_m -> k_up^2 s^2, pixel shuffle
  to (h s, w s, k_up^2), softmax over the k_up^2 taps, `reassemble_up` of the input.
  """

  def __init__(self, channels: int, scale: int, up_kernel: int = 5, encoder_kernel: int = 3,
               compressed_channels: int = 64, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = scale
    self.up_kernel = up_kernel
    self.channel_compressor = layers.Conv2d(
        channels, compressed_channels, 1, kernel_init=layers.xavier_uniform_hwio, dtype=dtype,
        rngs=rngs)
    self.content_encoder = layers.Conv2d(
        compressed_channels, up_kernel * up_kernel * scale * scale, encoder_kernel,
        padding=(encoder_kernel - 1) // 2, use_bias=True, kernel_init=_normal_0001, dtype=dtype,
        rngs=rngs)

  def kernels(self, x):
    """(N, h, w, C) -> (N, h s, w s, k_up^2) reassembly kernels, each summing to 1."""
    mask = self.content_encoder(self.channel_compressor(x))
    return jax.nn.softmax(pixel_shuffle(mask, self.scale).astype(jnp.float32), axis=-1)

  def __call__(self, x):
    return reassemble_up(x, self.kernels(x), self.up_kernel)


class CARAFEDown(nnx.Module):
  """The CARAFE++ downsampler: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C).

  compressor 1x1 C -> C_m (no bias), encoder k_enc x k_enc with stride 2 C_m -> k_down^2, softmax
  over the taps, `reassemble_down` over the
  k_down x k_down neighbourhood centred on each even input pixel (zero padding k_down // 2).
  """

  def __init__(self, channels: int, down_kernel: int = 3, encoder_kernel: int = 3,
               compressed_channels: int = 64, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.down_kernel = down_kernel
    self.channel_compressor = layers.Conv2d(
        channels, compressed_channels, 1, kernel_init=layers.xavier_uniform_hwio, dtype=dtype,
        rngs=rngs)
    self.content_encoder = layers.Conv2d(
        compressed_channels, down_kernel * down_kernel, encoder_kernel, stride=2,
        padding=(encoder_kernel - 1) // 2, use_bias=True, kernel_init=_normal_0001, dtype=dtype,
        rngs=rngs)

  def kernels(self, x):
    """(N, H, W, C) -> (N, ceil(H/2), ceil(W/2), k_down^2) kernels, each summing to 1."""
    mask = self.content_encoder(self.channel_compressor(x))
    return jax.nn.softmax(mask.astype(jnp.float32), axis=-1)

  def __call__(self, x):
    r = self.down_kernel // 2
    return reassemble_down(x, self.kernels(x), self.down_kernel, (r, r))
