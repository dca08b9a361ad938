"""Inception-v3 (torchvision `inception_v3`), NHWC, with torchvision's module names.

Attribute paths spell torchvision's state_dict keys (`Mixed_6b.branch7x7_2.conv.weight`), so the
converter (`grading.convert`) is a layout change per leaf. The auxiliary classifier (`AuxLogits`), a
training-time extra of the ImageNet recipe, is not built. The input is what torchvision's network sees
after `transform_input`: RGB scaled to [-1, 1], i.e. x / 127.5 - 1 (`normalize`).
"""
from flax import nnx
import jax
import jax.numpy as jnp

from m2mrf_jax import layers

FEATURES = 2048  # channels of the last feature map (Mixed_7c)


def normalize(pixels):
  """RGB pixels in [0, 255] -> the Inception-v3 input, (x / 255 - 0.5) / 0.5.

  torchvision's ImageNet weights see exactly this: its `transform_input` maps ImageNet-normalised
  input back to this Google scaling.
  """
  return pixels.astype(jnp.float32) / 127.5 - 1.0


def max_pool(x, size=3, stride=2):
  """torch max_pool2d(kernel=size, stride) without padding (floor): (N, H, W, C) -> (N, h, w, C)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1),
                               'VALID')


def avg_pool_3x3(x):
  """torch avg_pool2d(3, stride=1, padding=1) (count_include_pad=True): zeros count, divide by 9."""
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                ((0, 0), (1, 1), (1, 1), (0, 0)))
  return total / 9.0


def normal_01(key, shape):
  """torchvision Inception3 init: N(0, 0.1) (its truncation at +-2 lies 20 std out)."""
  return layers.blocked_random(key, shape, 'normal', 0.1)


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm(eps 0.001) -> ReLU; keys `conv.weight`, `bn.*`."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, *, dtype, rngs):
    self.conv = layers.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              kernel_init=normal_01, dtype=dtype, rngs=rngs)
    self.bn = layers.BatchNorm(out_channels, eps=0.001, dtype=dtype)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _chain(x, *convs):
  for conv in convs:
    x = conv(x)
  return x


class InceptionA(nnx.Module):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

  def __init__(self, c, pool_features, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch1x1 = BasicConv2d(c, 64, 1, **kw)
    self.branch5x5_1 = BasicConv2d(c, 48, 1, **kw)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(c, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
    self.branch_pool = BasicConv2d(c, pool_features, 1, **kw)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        _chain(x, self.branch5x5_1, self.branch5x5_2),
        _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
        self.branch_pool(avg_pool_3x3(x))], axis=-1)


class InceptionB(nnx.Module):
  """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + c channels."""

  def __init__(self, c, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch3x3 = BasicConv2d(c, 384, 3, stride=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(c, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
        max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 (1x7 and 7x1) convolutions -> 768 channels."""

  def __init__(self, c, c7, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch1x1 = BasicConv2d(c, 192, 1, **kw)
    self.branch7x7_1 = BasicConv2d(c, c7, 1, **kw)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_1 = BasicConv2d(c, c7, 1, **kw)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
    self.branch_pool = BasicConv2d(c, 192, 1, **kw)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
        _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
               self.branch7x7dbl_4, self.branch7x7dbl_5),
        self.branch_pool(avg_pool_3x3(x))], axis=-1)


class InceptionD(nnx.Module):
  """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + c channels."""

  def __init__(self, c, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(c, 192, 1, **kw)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
    self.branch7x7x3_1 = BasicConv2d(c, 192, 1, **kw)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

  def __call__(self, x):
    return jnp.concatenate([
        _chain(x, self.branch3x3_1, self.branch3x3_2),
        _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
        max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
  """8x8 block with split 1x3 / 3x1 outputs -> 2048 channels."""

  def __init__(self, c, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch1x1 = BasicConv2d(c, 320, 1, **kw)
    self.branch3x3_1 = BasicConv2d(c, 384, 1, **kw)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch3x3dbl_1 = BasicConv2d(c, 448, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch_pool = BasicConv2d(c, 192, 1, **kw)

  def __call__(self, x):
    y = self.branch3x3_1(x)
    z = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(y), self.branch3x3_2b(y),
        self.branch3x3dbl_3a(z), self.branch3x3dbl_3b(z),
        self.branch_pool(avg_pool_3x3(x))], axis=-1)


class Linear(nnx.Module):
  """torch.nn.Linear with an (in, out) `weight`: (..., in) -> (..., out)."""

  def __init__(self, in_features, out_features, *, kernel_init=normal_01, rngs):
    self.weight = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

  def __call__(self, x):
    return x.astype(jnp.float32) @ self.weight[...] + self.bias[...]


class InceptionV3(nnx.Module):
  """torchvision Inception3 without AuxLogits: (N, H, W, 3) in [-1, 1] -> (N, num_classes) logits.

  `features` gives the last feature map (N, h, w, 2048), h = w = 8 at 299x299, 26 at 896x896 (the
  input must be at least 75x75); `classify` is global average pooling, dropout and the fc layer.
  """

  def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *, dtype=jnp.float32,
               rngs: nnx.Rngs, dropout_rngs: nnx.Rngs | None = None):
    kw = dict(dtype=dtype, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, **kw)
    self.Mixed_7c = InceptionE(2048, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=dropout_rngs or nnx.Rngs(dropout=0))
    self.fc = Linear(FEATURES, num_classes, rngs=rngs)

  def features(self, x):
    """(N, H, W, 3) normalised -> (N, h, w, 2048) after Mixed_7c, in the compute dtype."""
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 75:
      raise ValueError(f'Inception-v3 input must be NHWC with 3 channels and at least 75x75, got '
                       f'shape {x.shape}')
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return x

  def classify(self, features):
    """(N, h, w, 2048) -> (N, num_classes) float32: global average pool, dropout, fc."""
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    return self.fc(self.dropout(pooled))

  def __call__(self, x):
    return self.classify(self.features(x))
