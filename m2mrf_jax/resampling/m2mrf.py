"""The M2MRF operator (many-to-many reassembly of features), NHWC.

encode 1x1 -> non-overlapping p x p patches -> linear -> linear -> q x q patches (q = p * scale)
-> decode 1x1. The patch vectors here are (ky, kx, c) ordered; the PyTorch code flattens them
channel-major (c, ky, kx), and `convert.py` permutes the two linear layers once.
"""
import math

from flax import nnx
import jax.numpy as jnp

from m2mrf_jax import layers

SCALES = tuple(2.0 ** t for t in range(-3, 4))


class PatchLinear(nnx.Module):
  """A linear map between patch tensors: `weight` of shape in_shape + out_shape, `bias` of out_shape.

  Initialised as xavier-uniform (fan_in = prod(in_shape), fan_out = prod(out_shape)) and zero bias.
  """

  def __init__(self, in_shape, out_shape, *, rngs: nnx.Rngs):
    self.weight = nnx.Param(layers.xavier_uniform(
        rngs.params(), (*in_shape, *out_shape), math.prod(in_shape), math.prod(out_shape)))
    self.bias = nnx.Param(jnp.zeros(out_shape, jnp.float32))


class PatchReassembly(nnx.Module):
  """Official `M2MRF_Module`: per-patch linear (p p C -> F) then linear (F -> q q C), no activation."""

  def __init__(self, channels: int, hidden: int, patch_size: int, out_patch_size: int, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    p, q = patch_size, out_patch_size
    self.patch_size = p
    self.dtype = dtype
    self.sample_fc = PatchLinear((p, p, channels), (hidden,), rngs=rngs)
    self.sample_fc1 = PatchLinear((hidden,), (q, q, channels), rngs=rngs)

  def __call__(self, x):
    """(N, H, W, C), H and W multiples of p -> (N, H q / p, W q / p, C)."""
    n, h, w, c = x.shape
    p = self.patch_size
    patches = x.reshape(n, h // p, p, w // p, p, c)
    hidden = jnp.einsum('nyawbc,abcf->nywf', patches, self.sample_fc.weight[...].astype(self.dtype))
    hidden = hidden + self.sample_fc.bias[...].astype(self.dtype)
    out = jnp.einsum('nywf,fabc->nyawbc', hidden, self.sample_fc1.weight[...].astype(self.dtype))
    bias = self.sample_fc1.bias[...].astype(self.dtype)  # (q, q, C) -> broadcast over (.., q, W', q, C)
    out = out + bias[:, None]
    q = out.shape[2]
    return out.reshape(n, h // p * q, w // p * q, c)


class M2MRF(nnx.Module):
  """Resample (N, H, W, C_in) by `scale` = 2^t, t in -3..3, to (N, max(floor(H s), 1), ..., C_out).

  Official `M2MRF`: zero-pad bottom/right to a multiple of `patch_size` BEFORE the encode conv (pad
  pixels become its bias), reassemble the padded map, crop to the unpadded size times `scale`. All four
  layers have biases; no norm, no activation; xavier-uniform weights, zero biases.
  """

  def __init__(self, in_channels: int, out_channels: int, scale: float, patch_size: int = 8,
               encode_rate: int = 4, fc_rate: int = 64, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if scale not in SCALES:
      raise ValueError(f'M2MRF scale must be 2^t for t in -3..3, got {scale}')
    out_patch_size = int(patch_size * scale)
    if out_patch_size < 1 or out_patch_size != patch_size * scale:
      raise ValueError(f'M2MRF patch_size {patch_size} times scale {scale} is not a positive integer')
    encode = int(in_channels / encode_rate)
    hidden = int(patch_size * patch_size * encode / fc_rate)
    if encode < 1 or hidden < 1:
      raise ValueError(f'M2MRF with {in_channels} channels, encode_rate {encode_rate} and fc_rate '
                       f'{fc_rate} leaves {encode} encode / {hidden} hidden channels')
    self.scale = scale
    self.patch_size = patch_size
    conv = dict(kernel_size=1, use_bias=True, kernel_init=layers.xavier_uniform_hwio, dtype=dtype,
                rngs=rngs)
    self.sample_encode_conv = layers.Conv2d(in_channels, encode, **conv)
    self.sample = PatchReassembly(encode, hidden, patch_size, out_patch_size, dtype=dtype, rngs=rngs)
    self.sample_decode_conv = layers.Conv2d(encode, out_channels, **conv)

  def __call__(self, x):
    _, h, w, _ = x.shape
    p = self.patch_size
    x = jnp.pad(x, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
    x = self.sample(self.sample_encode_conv(x))
    # The decode conv is 1x1, so cropping before it equals the official crop after it.
    x = x[:, :max(int(h * self.scale), 1), :max(int(w * self.scale), 1)]
    return self.sample_decode_conv(x)
