"""Max pooling that records its indices, and max unpooling with them (SegNet / `nn.MaxUnpool2d`)."""
from flax import nnx
import jax.numpy as jnp

from m2mrf_jax.resampling.windows import windows


def max_pool_with_indices(x, size: int = 3, stride: int = 2, padding: int = 1):
  """`nn.MaxPool2d(size, stride, padding, return_indices=True)`: (N, H, W, C) -> values, indices.

  Both (N, Ho, Wo, C); an index is the flat position y * W + x of the maximum in its input plane
  (the first one in scan order on ties, as torch).
  """
  _, h, w, _ = x.shape
  patches = windows(x, size, stride, (padding, padding), -jnp.inf)
  tap = jnp.argmax(patches, axis=3)
  values = jnp.max(patches, axis=3)
  ho, wo = values.shape[1:3]
  row = jnp.arange(ho)[:, None, None] * stride - padding + tap // size
  col = jnp.arange(wo)[None, :, None] * stride - padding + tap % size
  return values, row * w + col


def max_unpool(x, indices, size: tuple[int, int]):
  """`nn.MaxUnpool2d`: (N, h, w, C) values placed at `indices` of an (N, *size, C) zero map.

  Where several values share an index (overlapping windows), the last in scan order wins, as torch
  on CPU does.
  """
  n, h, w, c = x.shape
  flat_index = indices.reshape(n, h * w, c)
  order = jnp.broadcast_to(jnp.arange(h * w)[None, :, None], flat_index.shape)
  batch = jnp.arange(n)[:, None, None]
  channel = jnp.arange(c)[None, None, :]
  plane = size[0] * size[1]
  last = jnp.full((n, plane, c), -1).at[batch, flat_index, channel].max(order)
  keep = last[batch, flat_index, channel] == order
  values = jnp.where(keep, x.reshape(n, h * w, c), 0)
  out = jnp.zeros((n, plane, c), x.dtype).at[batch, flat_index, channel].add(values)
  return out.reshape(n, *size, c)


class MaxPool(nnx.Module):
  """3x3 stride-2 max pooling (padding 1): (N, H, W, C) -> ((N, ceil(H/2), ceil(W/2), C), guide).

  The guide (indices, (H, W)) lets the paired `MaxUnpool` undo it.
  """

  def __call__(self, x):
    values, indices = max_pool_with_indices(x)
    return values, (indices, x.shape[1:3])


class MaxUnpool(nnx.Module):
  """Max unpooling with the guide of the paired `MaxPool`: (N, h, w, C) -> (N, H, W, C)."""

  def __call__(self, x, guide):
    indices, size = guide
    return max_unpool(x, indices, size)
