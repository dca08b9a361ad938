"""The segmentor: HRNetV2(+M2MRF) backbone, FCN head, logits at the input resolution; `build`."""
from flax import nnx
import jax
import jax.numpy as jnp

from m2mrf_jax import layers
from m2mrf_jax.hrnet import HRNet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class ConvModule(nnx.Module):
  """mmcv ConvModule: conv (no bias, kaiming normal fan_out) -> BN -> ReLU."""

  def __init__(self, in_channels: int, out_channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = layers.Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
    self.bn = layers.BatchNorm(out_channels, dtype=dtype)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


class FCNHead(nnx.Module):
  """mmseg FCNHead, resize_concat of all branches, num_convs=1, kernel 1, no concat_input, no dropout.

  List of (N, H_i, W_i, C_i) -> (N, H_0, W_0, num_classes) logits.
  """

  def __init__(self, in_channels, num_classes: int, *, dtype, rngs: nnx.Rngs):
    channels = sum(in_channels)
    self.convs = nnx.List([ConvModule(channels, channels, dtype=dtype, rngs=rngs)])
    self.conv_seg = layers.Conv2d(channels, num_classes, 1, use_bias=True,
                                  kernel_init=layers.normal_001, dtype=dtype, rngs=rngs)

  def __call__(self, xs):
    # conv1x1(concat_i(resize(x_i))) = sum_i resize(x_i @ W_i), W_i the rows of branch i: the 720-channel
    # matmul runs at each branch's own resolution (8x fewer FLOPs at W48), then the sum is resized.
    module = self.convs[0]
    conv = module.conv
    weight = conv.weight[...][0, 0].astype(conv.dtype)
    size = xs[0].shape[1:3]
    y, start = None, 0
    for x in xs:
      part = layers.pointwise(x.astype(conv.dtype), weight[start:start + x.shape[-1]])
      start += x.shape[-1]
      part = layers.resize_bilinear(part, size)
      y = part if y is None else y + part
    return self.conv_seg(jax.nn.relu(module.bn(y)))


class Segmentor(nnx.Module):
  """mmseg EncoderDecoder: (N, H, W, 3) float32 -> (N, H, W, num_classes) float32 logits.

  The head's 1/4-resolution logits are upsampled bilinearly (align_corners=False) in float32.
  """

  def __init__(self, backbone: HRNet, decode_head: FCNHead, dtype=jnp.float32):
    self.backbone = backbone
    self.decode_head = decode_head
    self.dtype = dtype

  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'model input must be NHWC with 3 channels, got shape {x.shape}')
    logits = self.decode_head(self.backbone(x.astype(self.dtype))).astype(jnp.float32)
    return layers.resize_bilinear(logits, x.shape[1:3])


def build(model_config, rngs: nnx.Rngs) -> Segmentor:
  """The network that `model_config` (configs.common.model_config) describes, freshly initialised.

  Initialisation as the official code from scratch: kaiming normal (fan_out) convs, BN 1/0,
  xavier-uniform M2MRF layers with zero bias, N(0, 0.01) classifier.
  """
  if model_config.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(DTYPES)}, got {model_config.dtype!r}')
  dtype = DTYPES[model_config.dtype]
  rngs = layers.KeyStream(rngs)
  backbone = HRNet(model_config.variant, model_config.width, model_config.patch_size,
                   model_config.encode_rate, model_config.fc_rate,
                   down=model_config.get('down', ''), up=model_config.get('up', ''), dtype=dtype,
                   remat=model_config.remat, rngs=rngs)
  head = FCNHead(backbone.channels, model_config.num_classes, dtype=dtype, rngs=rngs)
  return Segmentor(backbone, head, dtype)
