"""HRNetV2 (mmseg `HRNet` / official `HRNet_M2MRF`), NHWC, with the resampling operators per variant.

Variants pick how branches change resolution (stages 2-4 and their transitions alike):
  base: stride-2 3x3 convs down, bilinear up;   a: one-step M2MRF down, one-step M2MRF up;
  b: one-step down, cascade up;   c: cascade down, one-step up;   d: cascade down, cascade up.
Attribute paths spell the mmseg keys, e.g. `stage2[0].fuse_layers[0][1].sample_0.sample.sample_fc`.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from m2mrf_jax import layers
from m2mrf_jax.m2mrf import M2MRF

# variant -> (down path, up path)
VARIANTS = {
    'base': ('conv', 'bilinear'),
    'a': ('onestep', 'onestep'),
    'b': ('onestep', 'cascade'),
    'c': ('cascade', 'onestep'),
    'd': ('cascade', 'cascade'),
}
WIDTHS = (18, 32, 48)
NUM_MODULES = (1, 4, 3)  # stages 2, 3, 4
NUM_BLOCKS = 4


def remat_call(module, x, remat=False):
  """`module(x)`, rematerialised in the backward pass (activations recomputed) if `remat`."""
  if remat:
    return nnx.remat(lambda m, v: m(v))(module, x)
  return module(x)


class BasicBlock(nnx.Module):
  """mmseg ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv1 = layers.Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)
    self.bn1 = layers.BatchNorm(channels, dtype=dtype)
    self.conv2 = layers.Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = layers.BatchNorm(channels, dtype=dtype)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    return jax.nn.relu(self.bn2(self.conv2(y)) + x)


class Bottleneck(nnx.Module):
  """mmseg ResNet Bottleneck (expansion 4, stride 1): 1x1-3x3-1x1 with BN, optional 1x1 downsample."""

  def __init__(self, in_channels: int, planes: int, *, dtype, rngs: nnx.Rngs):
    out = planes * 4
    self.conv1 = layers.Conv2d(in_channels, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = layers.BatchNorm(planes, dtype=dtype)
    self.conv2 = layers.Conv2d(planes, planes, 3, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = layers.BatchNorm(planes, dtype=dtype)
    self.conv3 = layers.Conv2d(planes, out, 1, dtype=dtype, rngs=rngs)
    self.bn3 = layers.BatchNorm(out, dtype=dtype)
    self.downsample = layers.Sequential(
        layers.Conv2d(in_channels, out, 1, dtype=dtype, rngs=rngs),
        layers.BatchNorm(out, dtype=dtype)) if in_channels != out else None

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + (x if self.downsample is None else self.downsample(x)))


class Resampling:
  """Builds the resolution-changing paths of one variant (no parameters of its own)."""

  def __init__(self, variant: str, patch_size: int, encode_rate: int, fc_rate: int, dtype,
               rngs: nnx.Rngs):
    self.down, self.up = VARIANTS[variant]
    self.dtype = dtype
    self.rngs = rngs
    self.m2mrf_kw = dict(patch_size=patch_size, encode_rate=encode_rate, fc_rate=fc_rate,
                         dtype=dtype, rngs=rngs)

  def bn(self, channels):
    return layers.BatchNorm(channels, dtype=self.dtype)

  def halve(self, c_in, c_out):
    """One 1/2 step: M2MRF(0.5) in the M2MRF variants, a 3x3 stride-2 conv (padding 1) in base."""
    if self.down == 'conv':
      return layers.Conv2d(c_in, c_out, 3, stride=2, padding=1, dtype=self.dtype, rngs=self.rngs)
    return M2MRF(c_in, c_out, 0.5, **self.m2mrf_kw)

  def transition(self, c_in, c_out):
    """A new branch: Seq(Seq(halve, BN, ReLU)); keys `transitionK.{i}.0.{0,1}`."""
    return layers.Sequential(layers.Sequential(self.halve(c_in, c_out), self.bn(c_out), jax.nn.relu))

  def fuse_down(self, c_j, c_i, steps):
    """Branch j to the coarser branch j + steps: M2MRF/conv then BN; ReLU on intermediate cascade steps."""
    if self.down == 'onestep':
      return layers.Sequential(
          layers.Sequential(M2MRF(c_j, c_i, 0.5 ** steps, **self.m2mrf_kw), self.bn(c_i)))
    stages = []
    for k in range(steps):
      if k == steps - 1:
        stages.append(layers.Sequential(self.halve(c_j, c_i), self.bn(c_i)))
      else:
        stages.append(layers.Sequential(self.halve(c_j, c_j), self.bn(c_j), jax.nn.relu))
    return layers.Sequential(*stages)

  def fuse_up(self, c_j, c_i, steps):
    """Conv1x1 C_j -> C_i, BN, then upsample by 2^steps at C_i; nothing after the upsampling."""
    head = [layers.Conv2d(c_j, c_i, 1, dtype=self.dtype, rngs=self.rngs), self.bn(c_i)]
    if self.up == 'cascade':
      samples = [M2MRF(c_i, c_i, 2.0, **self.m2mrf_kw) for _ in range(steps)]
      names = ('0', '1', *(f'sample_{k}' for k in range(steps)))
      return layers.Sequential(*head, *samples, names=names)
    if self.up == 'onestep':
      return layers.Sequential(*head, M2MRF(c_i, c_i, 2.0 ** steps, **self.m2mrf_kw))
    return layers.Sequential(*head, layers.Upsample(2 ** steps))


class HRModule(nnx.Module):
  """Parallel branches of BasicBlocks, then multi-resolution fusion of every branch into every branch."""

  def __init__(self, channels, resampling: Resampling, *, dtype, rngs: nnx.Rngs):
    n = len(channels)
    self.branches = nnx.List([
        layers.Sequential(*(BasicBlock(c, dtype=dtype, rngs=rngs) for _ in range(NUM_BLOCKS)))
        for c in channels])
    fuse = []
    for i in range(n):
      row = []
      for j in range(n):
        if j > i:
          row.append(resampling.fuse_up(channels[j], channels[i], j - i))
        elif j == i:
          row.append(None)
        else:
          row.append(resampling.fuse_down(channels[j], channels[i], i - j))
      fuse.append(nnx.List(row))
    self.fuse_layers = nnx.List(fuse)

  def __call__(self, xs):
    """List of (N, H_i, W_i, C_i) -> list of the same shapes."""
    xs = [branch(x) for branch, x in zip(self.branches, xs)]
    out = []
    for i, row in enumerate(self.fuse_layers):
      y = xs[i]
      for j, path in enumerate(row):
        if j > i:
          y = y + layers.resize_bilinear(path(xs[j]), xs[i].shape[1:3])
        elif j < i:
          y = y + path(xs[j])
      out.append(jax.nn.relu(y))
    return out


class HRNet(nnx.Module):
  """HRNetV2 backbone: (N, H, W, 3) -> 4 branches (N, H/4.., W/4.., C), (.. H/32.., 8C).

  Stem (two 3x3 stride-2 convs), layer1 (4 Bottlenecks, 64 -> 256), stages 2-4 with (1, 4, 3)
  HRModules of 4 BasicBlocks per branch; channels (W, 2W, 4W, 8W).
  """

  def __init__(self, variant: str = 'c', width: int = 48, patch_size: int = 8, encode_rate: int = 4,
               fc_rate: int = 64, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    if variant not in VARIANTS:
      raise ValueError(f'model.variant must be one of {tuple(VARIANTS)}, got {variant!r}')
    if width not in WIDTHS:
      raise ValueError(f'model.width must be one of {WIDTHS}, got {width!r}')
    self.remat = remat
    resampling = Resampling(variant, patch_size, encode_rate, fc_rate, dtype, rngs)
    self.conv1 = layers.Conv2d(3, 64, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
    self.bn1 = layers.BatchNorm(64, dtype=dtype)
    self.conv2 = layers.Conv2d(64, 64, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = layers.BatchNorm(64, dtype=dtype)
    self.layer1 = layers.Sequential(*(Bottleneck(64 if k == 0 else 256, 64, dtype=dtype, rngs=rngs)
                                      for k in range(4)))
    self.channels = tuple(width * 2 ** k for k in range(4))
    previous = (256,)
    for stage, num_modules in enumerate(NUM_MODULES, start=2):
      current = self.channels[:stage]
      transition = [
          layers.Sequential(
              layers.Conv2d(previous[i], c, 3, padding=1, dtype=dtype, rngs=rngs),
              layers.BatchNorm(c, dtype=dtype), jax.nn.relu) if c != previous[i] else None
          for i, c in enumerate(current[:-1])]
      transition.append(resampling.transition(previous[-1], current[-1]))
      setattr(self, f'transition{stage - 1}', nnx.List(transition))
      setattr(self, f'stage{stage}', layers.Sequential(
          *(HRModule(current, resampling, dtype=dtype, rngs=rngs) for _ in range(num_modules))))
      previous = current

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    x = remat_call(self.layer1, x, self.remat)
    xs = [x]
    for stage in (2, 3, 4):
      transition = getattr(self, f'transition{stage - 1}')
      # As mmseg: every transition layer present (a new branch, a channel change) reads the last branch.
      xs = [xs[i] if t is None else t(xs[-1]) for i, t in enumerate(transition)]
      for module in getattr(self, f'stage{stage}'):
        xs = remat_call(module, xs, self.remat)
    return xs
