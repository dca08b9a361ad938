"""SiAN, the Side-Attention Net of Wei et al. ("Learn to segment retinal lesions and beyond"), with the
M2MRF-HRNetV2 segmenter as its side branch: one photograph in, a DR grade and lesion maps out.

  main branch   Inception-v3 on the photograph -> feature maps f (N, h, w, 2048)
  side branch   the lesion segmenter on the same photograph -> lesion logits (N, H/4, W/4, 4),
                frozen by default (run in eval mode, no gradient), as the paper found best
  side attention  the sigmoid lesion maps, max-pooled onto the (h, w) grid of f, become 2048 weight
                maps w: 'conv' = the paper's lightweight block of two 3x3 convolutions (Eq. 7), then a
                sigmoid; 'maxpool' = the channel-wise max over the lesion maps (Eq. 6); 'none' = the
                plain Inception-v3 baseline
  head          GAP(f * w) -> dropout -> fc (2048 x num_classes)
"""
from flax import nnx
import jax
import jax.numpy as jnp

from m2mrf_jax import layers
from m2mrf_jax import models
from m2mrf_jax.grading import inception

ATTENTIONS = ('conv', 'maxpool', 'none')


def adaptive_max_pool(x, size):
  """torch `adaptive_max_pool2d`: (N, H, W, C) -> (N, h, w, C); cell i spans [floor(iH/h), ceil((i+1)H/h)).

  Max pooling keeps a microaneurysm of one pixel visible on a grid 32 times coarser.
  """
  for axis, out in ((1, size[0]), (2, size[1])):
    length = x.shape[axis]
    i = jnp.arange(out)
    start = (i * length) // out
    end = -((-(i + 1) * length) // out)
    width = int(max(-(-(k + 1) * length // out) - (k * length) // out for k in range(out)))
    # Window positions past a cell's end repeat its last element, which leaves the max unchanged.
    index = jnp.minimum(start[:, None] + jnp.arange(width)[None, :], end[:, None] - 1)
    x = jnp.take(x, index.reshape(-1), axis=axis)
    shape = x.shape[:axis] + (out, width) + x.shape[axis + 1:]
    x = x.reshape(shape).max(axis=axis + 1)
  return x


class SideAttention(nnx.Module):
  """Lesion maps (N, h, w, m) in [0, 1] -> weight maps (N, h, w, 2048) in [0, 1]."""

  def __init__(self, mode: str, num_lesions: int, channels: int, *, dtype, rngs: nnx.Rngs):
    if mode not in ATTENTIONS:
      raise ValueError(f'model.attention must be one of {ATTENTIONS}, got {mode!r}')
    self.mode = mode
    if mode == 'conv':
      self.conv1 = layers.Conv2d(num_lesions, channels, 3, padding=1, use_bias=True, dtype=dtype,
                                 rngs=rngs)
      self.conv2 = layers.Conv2d(channels, inception.FEATURES, 3, padding=1, use_bias=True,
                                 dtype=dtype, rngs=rngs)

  def __call__(self, maps):
    if self.mode == 'maxpool':
      return jnp.max(maps, axis=-1, keepdims=True)  # broadcast over the 2048 feature maps
    return jax.nn.sigmoid(self.conv2(jax.nn.relu(self.conv1(maps))).astype(jnp.float32))


class SiAN(nnx.Module):
  """(N, H, W, 3) RGB pixels in [0, 255] (any dtype) -> (grade logits (N, K), lesion logits).

  The lesion logits are the segmenter's head output at 1/4 of the input size (N, H/4, W/4, 4); resize
  them bilinearly before the sigmoid for maps at the input size, as the segmentation job does.
  """

  def __init__(self, main: inception.InceptionV3, side: models.Segmentor | None,
               attention: SideAttention, side_mean, side_std, freeze_side: bool = True):
    self.main = main
    self.side = side
    self.attention = attention
    self.side_mean = tuple(float(v) for v in side_mean)
    self.side_std = tuple(float(v) for v in side_std)
    self.freeze_side = freeze_side

  def train(self, **attributes):
    """Train mode, but a frozen side branch stays in eval mode (its BN uses running statistics)."""
    super().train(**attributes)
    if self.freeze_side and self.side is not None:
      self.side.eval()

  def lesion_logits(self, pixels):
    """(N, H, W, 3) pixels -> (N, H/4, W/4, 4) float32 lesion logits of the side branch."""
    x = (pixels.astype(jnp.float32) - jnp.asarray(self.side_mean)) / jnp.asarray(self.side_std)
    logits = self.side.decode_head(self.side.backbone(x.astype(self.side.dtype))).astype(jnp.float32)
    return jax.lax.stop_gradient(logits) if self.freeze_side else logits

  def __call__(self, pixels):
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
      raise ValueError(f'SiAN input must be NHWC RGB pixels, got shape {pixels.shape}')
    features = self.main.features(inception.normalize(pixels))
    if self.side is None:
      return self.main.classify(features), None
    lesions = self.lesion_logits(pixels)
    maps = adaptive_max_pool(jax.nn.sigmoid(lesions), features.shape[1:3])
    weights = self.attention(maps)
    return self.main.classify(features.astype(jnp.float32) * weights), lesions


def build(model_config, rngs: nnx.Rngs) -> SiAN:
  """The SiAN that `model_config` (configs/grading_common.py) describes, freshly initialised.

  Initialisation as torchvision's Inception-v3 (N(0, 0.1) convs and fc) and the segmentation job's
  model (`models.build`) for the side branch; the attention convs as the segmenter's convs.
  """
  if model_config.dtype not in models.DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(models.DTYPES)}, got {model_config.dtype!r}')
  dtype = models.DTYPES[model_config.dtype]
  keys = layers.KeyStream(rngs)
  main = inception.InceptionV3(model_config.num_classes, model_config.dropout, dtype=dtype,
                               rngs=keys, dropout_rngs=nnx.Rngs(dropout=keys.params()))
  attention = SideAttention(model_config.attention, model_config.side.num_classes,
                            model_config.attention_channels, dtype=dtype, rngs=keys)
  side = None
  if model_config.attention != 'none':
    side = models.build(model_config.side, nnx.Rngs(keys.params()))
  return SiAN(main, side, attention, model_config.side_mean, model_config.side_std,
              model_config.freeze_side)


def trainable(model_config):
  """The nnx filter of the parameters the optimizer updates: all but a frozen side branch's."""
  if model_config.freeze_side:
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains('side')))
  return nnx.Param
