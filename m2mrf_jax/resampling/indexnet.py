"""IndexNet index pooling / unpooling (Lu et al., ICCV 2019 / TPAMI 2020; poppinace/indexnet_matting).

An index block predicts, for every 2x2 cell, 4 per-channel weights from the feature being pooled:
4 convs 2x2 stride 2 C -> C (the depthwise many-to-one "M2O" block, linear, no context), sigmoid.
The encoder pools with the softmax of those over the 4 positions (x * idx_en summed per cell);
the decoder upsamples nearest x2 and multiplies by the sigmoid map idx_de of the paired pooling.
"""
from flax import nnx
import jax
import jax.numpy as jnp

from m2mrf_jax import layers
from m2mrf_jax.resampling.windows import pad_to_even


def _cells_to_map(z):
  """(N, h, w, 4, C), tap k = 2 i + j -> (N, 2h, 2w, C) with tap k at (2y + i, 2x + j)."""
  n, h, w, _, c = z.shape
  return z.reshape(n, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)


class IndexPool(nnx.Module):
  """(N, H, W, C) -> ((N, ceil(H/2), ceil(W/2), C), guide); odd maps are zero-padded bottom/right.

  The guide (idx_de (N, 2 ceil(H/2), 2 ceil(W/2), C), (H, W)) feeds the paired `IndexUnpool`.
  """

  def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    conv = dict(stride=2, dtype=dtype, rngs=rngs)
    self.indexnet1 = layers.Conv2d(channels, channels, 2, **conv)
    self.indexnet2 = layers.Conv2d(channels, channels, 2, **conv)
    self.indexnet3 = layers.Conv2d(channels, channels, 2, **conv)
    self.indexnet4 = layers.Conv2d(channels, channels, 2, **conv)

  def indices(self, x):
    """(N, H, W, C), H and W even -> idx_en, idx_de, both (N, H, W, C)."""
    blocks = (self.indexnet1, self.indexnet2, self.indexnet3, self.indexnet4)
    y = jax.nn.sigmoid(jnp.stack([b(x) for b in blocks], axis=3).astype(jnp.float32))
    z = jax.nn.softmax(y, axis=3)
    return _cells_to_map(z).astype(x.dtype), _cells_to_map(y).astype(x.dtype)

  def __call__(self, x):
    size = x.shape[1:3]
    x = pad_to_even(x)
    idx_en, idx_de = self.indices(x)
    n, h, w, c = x.shape
    pooled = (x * idx_en).reshape(n, h // 2, 2, w // 2, 2, c).sum((2, 4))
    return pooled, (idx_de, size)


class IndexUnpool(nnx.Module):
  """Nearest x2 upsampling times idx_de of the paired `IndexPool`: (N, h, w, C) -> (N, H, W, C)."""

  def __call__(self, x, guide):
    idx_de, (h, w) = guide
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return (up * idx_de.astype(up.dtype))[:, :h, :w]
