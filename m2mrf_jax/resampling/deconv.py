"""Deconvolution (transposed convolution) with kernel = stride: `nn.ConvTranspose2d(C_in, C_out, s, s)`."""
from flax import nnx
import jax.numpy as jnp

from m2mrf_jax import layers


class Deconv(nnx.Module):
  """(N, h, w, C_in) -> (N, h s, w s, C_out); `weight` (s, s, C_in, C_out), no bias.

  out[n, y s + i, x s + j, o] = sum_c in[n, y, x, c] weight[i, j, c, o]: each input pixel paints its
  own s x s block. Initialised as the other convs (kaiming normal, fan_out).
  """

  def __init__(self, in_channels: int, out_channels: int, scale: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.scale = scale
    self.dtype = dtype
    self.weight = nnx.Param(layers.kaiming_normal_fan_out(
        rngs.params(), (scale, scale, in_channels, out_channels)))

  def __call__(self, x):
    n, h, w, _ = x.shape
    s = self.scale
    y = jnp.einsum('nhwc,ijco->nhiwjo', x.astype(self.dtype), self.weight[...].astype(self.dtype))
    return y.reshape(n, h * s, w * s, -1)
