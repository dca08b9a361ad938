"""Sliding windows (torch `F.unfold`) and kernel reassembly, the shared math of the resampling operators."""
import jax.numpy as jnp


def windows(x, size: int, stride: int, pad: tuple[int, int], value=0.0):
  """(N, H, W, C) -> (N, Ho, Wo, size * size, C), Ho = (H + pad[0] + pad[1] - size) // stride + 1.

  Tap t = ky * size + kx of output (y, x) is x[y * stride - pad[0] + ky, x * stride - pad[0] + kx],
  `value` outside the map.
  """
  _, h, w, _ = x.shape
  before, after = pad
  x = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)), constant_values=value)
  ho = (h + before + after - size) // stride + 1
  wo = (w + before + after - size) // stride + 1
  taps = [x[:, ky:ky + stride * (ho - 1) + 1:stride, kx:kx + stride * (wo - 1) + 1:stride]
          for ky in range(size) for kx in range(size)]
  return jnp.stack(taps, axis=3)


def reassemble_up(x, kernels, size: int):
  """CARAFE reassembly: (N, h, w, C), kernels (N, h s, w s, size^2) -> (N, h s, w s, C).

  out[p] = sum_t kernels[p, t] x[p // s + (ky, kx) - size // 2], zero outside (t = ky * size + kx).
  """
  n, h, w, c = x.shape
  s = kernels.shape[1] // h
  patches = windows(x, size, 1, (size // 2, size // 2))  # (N, h, w, k^2, C)
  kernels = kernels.reshape(n, h, s, w, s, size * size)
  out = jnp.einsum('nhwtc,nhiwjt->nhiwjc', patches, kernels.astype(x.dtype))
  return out.reshape(n, h * s, w * s, c)


def reassemble_down(x, kernels, size: int, pad: tuple[int, int]):
  """Strided reassembly: x (N, H, W, C), kernels (N, Ho, Wo, size^2) -> (N, Ho, Wo, C).

  out[q] = sum_t kernels[q, t] x[2 q - pad[0] + (ky, kx)], zero outside.
  """
  patches = windows(x, size, 2, pad)
  return jnp.einsum('nhwtc,nhwt->nhwc', patches, kernels.astype(x.dtype))


def pad_to_even(x):
  """Zero-pad bottom/right so that H and W are even (operators that halve by a 2x2 grid)."""
  _, h, w, _ = x.shape
  return jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def pixel_shuffle(x, scale: int):
  """(N, h, w, T * s * s) with channel t * s^2 + i * s + j (torch `F.pixel_shuffle` order) -> (N, h s, w s, T)."""
  n, h, w, c = x.shape
  t = c // (scale * scale)
  x = x.reshape(n, h, w, t, scale, scale).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * scale, w * scale, t)
