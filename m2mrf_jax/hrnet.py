"""HRNetV2 (mmseg `HRNet` / official `HRNet_M2MRF`), NHWC, with pluggable resampling operators.

Every place where branches change resolution (the fuse layers of stages 2-4, and the transitions that
open a new branch) uses the `down` / `up` operators of `model.down` / `model.up`, or the pair of the
named `variant`:
  base: stride-2 3x3 convs down, bilinear up;   a: one-step M2MRF down, one-step M2MRF up;
  b: one-step down, cascade up;   c: cascade down, one-step up;   d: cascade down, cascade up.
The other operators are those of the paper's Tables 2 and 5 (see `Resampling`).
Attribute paths spell the mmseg keys, e.g. `stage2[0].fuse_layers[0][1].sample_0.sample.sample_fc`.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from m2mrf_jax import layers
from m2mrf_jax.resampling.a2u import A2UDown, A2UUp
from m2mrf_jax.resampling.carafe import CARAFE, CARAFEDown
from m2mrf_jax.resampling.deconv import Deconv
from m2mrf_jax.resampling.indexnet import IndexPool, IndexUnpool
from m2mrf_jax.resampling.lip import LIP
from m2mrf_jax.resampling.m2mrf import M2MRF
from m2mrf_jax.resampling.pooling import MaxPool, MaxUnpool

DOWN = ('strideconv', 'maxpool', 'lip', 'carafe', 'indexnet', 'a2u', 'm2mrf_onestep',
        'm2mrf_cascade')
UP = ('bilinear', 'unpool', 'deconv', 'carafe', 'indexnet', 'a2u', 'm2mrf_onestep', 'm2mrf_cascade')
# Up operators that reuse what the paired down path of the same HRModule recorded.
PAIRED_UP = {'unpool': 'maxpool', 'indexnet': 'indexnet', 'a2u': 'a2u'}
# variant -> (down, up): the five released models.
VARIANTS = {
    'base': ('strideconv', 'bilinear'),
    'a': ('m2mrf_onestep', 'm2mrf_onestep'),
    'b': ('m2mrf_onestep', 'm2mrf_cascade'),
    'c': ('m2mrf_cascade', 'm2mrf_onestep'),
    'd': ('m2mrf_cascade', 'm2mrf_cascade'),
}
GUIDED_DOWN = (MaxPool, IndexPool, A2UDown)
GUIDED_UP = (MaxUnpool, IndexUnpool, A2UUp)
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


class Guided(layers.Sequential):
  """A down path whose layers may record a guide for the paired up path: x -> (y, guides).

  Layers in `GUIDED_DOWN` return (y, guide), nested `Guided` return (y, guides); the guides are
  collected in order (finest resolution first). With `keep_guides=False` it returns y alone.
  """

  def __init__(self, *layers_, keep_guides: bool = True):
    super().__init__(*layers_)
    self.keep_guides = keep_guides

  def __call__(self, x):
    guides = []
    for layer in self:
      if isinstance(layer, Guided):
        x, more = layer(x)
        guides.extend(more)
      elif isinstance(layer, GUIDED_DOWN):
        x, guide = layer(x)
        guides.append(guide)
      else:
        x = layer(x)
    return (x, guides) if self.keep_guides else x


class GuidedUp(layers.Sequential):
  """An up path whose `GUIDED_UP` layers consume the paired down path's guides, coarsest first."""

  def __call__(self, x, guides):
    guides = list(guides)
    for layer in self:
      x = layer(x, guides.pop()) if isinstance(layer, GUIDED_UP) else layer(x)
    return x


class Resampling:
  """Builds the resolution-changing paths for one (down, up) pair (no parameters of its own).

  A down step C_in -> C_out (then BN, and ReLU on intermediate cascade steps and transitions):
    strideconv: 3x3 stride-2 conv;   m2mrf_*: M2MRF(1/2) (m2mrf_onestep: one M2MRF(1/2^t) per path);
    maxpool: 3x3 stride-2 max pool, a 1x1 conv where channels change, no BN between cascaded pools;
    lip: 3x3 conv (stride 1) then LIP;   a2u: 3x3 conv (stride 1) then A2U downsampling;
    carafe: CARAFE++ downsampling then a 3x3 conv (stride 1);
    indexnet: index pooling then a 3x3 conv (stride 1);
    carafe and indexnet replace the fuse layers' stride convs only (transitions keep theirs).
  An up path: 1x1 conv C_j -> C_i, BN, then x2^t at C_i by bilinear / CARAFE(2^t) / M2MRF, or
  t x2 steps that reuse the guides of the paired down path of the same HRModule (unpool: max indices,
  indexnet: decoder indices, a2u: up kernels); deconv replaces the 1x1 conv by a deconvolution
  C_j -> C_i with kernel = stride = 2^t, then BN.
  """

  def __init__(self, down: str, up: str, patch_size: int, encode_rate: int, fc_rate: int, dtype,
               rngs: nnx.Rngs):
    if down not in DOWN:
      raise ValueError(f'model.down must be one of {DOWN}, got {down!r}')
    if up not in UP:
      raise ValueError(f'model.up must be one of {UP}, got {up!r}')
    if up in PAIRED_UP and down != PAIRED_UP[up]:
      raise ValueError(f'model.up={up!r} reuses what the down path records: it needs '
                       f'model.down={PAIRED_UP[up]!r}, got {down!r}')
    self.down, self.up = down, up
    self.dtype = dtype
    self.rngs = rngs
    self.m2mrf_kw = dict(patch_size=patch_size, encode_rate=encode_rate, fc_rate=fc_rate,
                         dtype=dtype, rngs=rngs)

  def bn(self, channels):
    return layers.BatchNorm(channels, dtype=self.dtype)

  def conv(self, c_in, c_out, kernel_size, stride=1):
    return layers.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2,
                         dtype=self.dtype, rngs=self.rngs)

  def step(self, c_in, c_out, transition=False):
    """The layers of one 1/2 step C_in -> C_out, before its BN."""
    kw = dict(dtype=self.dtype, rngs=self.rngs)
    down = self.down
    if down in ('carafe', 'indexnet') and transition:
      down = 'strideconv'
    if down == 'strideconv':
      return [self.conv(c_in, c_out, 3, stride=2)]
    if down.startswith('m2mrf'):
      return [M2MRF(c_in, c_out, 0.5, **self.m2mrf_kw)]
    if down == 'maxpool':
      return [MaxPool()] + ([self.conv(c_in, c_out, 1)] if c_in != c_out else [])
    if down == 'lip':
      return [self.conv(c_in, c_out, 3), LIP(c_out, **kw)]
    if down == 'a2u':
      return [self.conv(c_in, c_out, 3), A2UDown(c_out, **kw)]
    if down == 'carafe':
      return [CARAFEDown(c_in, **kw), self.conv(c_in, c_out, 3)]
    return [IndexPool(c_in, **kw), self.conv(c_in, c_out, 3)]  # indexnet

  @staticmethod
  def container(parts, keep_guides=True):
    """`Guided` if any part records a guide, else `layers.Sequential`."""
    if any(isinstance(p, (Guided, *GUIDED_DOWN)) for p in parts):
      return Guided(*parts, keep_guides=keep_guides)
    return layers.Sequential(*parts)

  def transition(self, c_in, c_out):
    """A new branch: Seq(Seq(step, BN, ReLU)); keys `transitionK.{i}.0.{0,1}` for stride conv / M2MRF."""
    parts = [*self.step(c_in, c_out, transition=True), self.bn(c_out), jax.nn.relu]
    return layers.Sequential(self.container(parts, keep_guides=False))

  def fuse_down(self, c_j, c_i, steps):
    """Branch j to the coarser branch j + steps: step then BN; ReLU on intermediate cascade steps."""
    if self.down == 'm2mrf_onestep':
      return layers.Sequential(
          layers.Sequential(M2MRF(c_j, c_i, 0.5 ** steps, **self.m2mrf_kw), self.bn(c_i)))
    if self.down == 'maxpool':
      return Guided(*(MaxPool() for _ in range(steps)), self.conv(c_j, c_i, 1), self.bn(c_i))
    stages = []
    for k in range(steps):
      if k == steps - 1:
        stages.append(self.container([*self.step(c_j, c_i), self.bn(c_i)]))
      else:
        stages.append(self.container([*self.step(c_j, c_j), self.bn(c_j), jax.nn.relu]))
    return self.container(stages)

  def fuse_up(self, c_j, c_i, steps):
    """Conv1x1 C_j -> C_i, BN, then upsample by 2^steps at C_i; nothing after the upsampling."""
    scale = 2 ** steps
    if self.up == 'deconv':
      return layers.Sequential(Deconv(c_j, c_i, scale, dtype=self.dtype, rngs=self.rngs),
                               self.bn(c_i))
    head = [self.conv(c_j, c_i, 1), self.bn(c_i)]
    if self.up == 'm2mrf_cascade':
      samples = [M2MRF(c_i, c_i, 2.0, **self.m2mrf_kw) for _ in range(steps)]
      names = ('0', '1', *(f'sample_{k}' for k in range(steps)))
      return layers.Sequential(*head, *samples, names=names)
    if self.up == 'm2mrf_onestep':
      return layers.Sequential(*head, M2MRF(c_i, c_i, 2.0 ** steps, **self.m2mrf_kw))
    if self.up == 'carafe':
      return layers.Sequential(*head, CARAFE(c_i, scale, dtype=self.dtype, rngs=self.rngs))
    if self.up == 'unpool':
      return GuidedUp(*head, *(MaxUnpool() for _ in range(steps)))
    if self.up == 'indexnet':
      return GuidedUp(*head, *(IndexUnpool() for _ in range(steps)))
    if self.up == 'a2u':
      return GuidedUp(*head, *(A2UUp() for _ in range(steps)))
    return layers.Sequential(*head, layers.Upsample(scale))


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
    downs, guides = {}, {}
    for i, row in enumerate(self.fuse_layers):  # down paths first: up paths may need their guides
      for j in range(i):
        downs[i, j] = row[j](xs[j])
        if isinstance(row[j], Guided):
          downs[i, j], guides[i, j] = downs[i, j]
    out = []
    for i, row in enumerate(self.fuse_layers):
      y = xs[i]
      for j, path in enumerate(row):
        if j > i:
          up = path(xs[j], guides[j, i]) if isinstance(path, GuidedUp) else path(xs[j])
          y = y + layers.resize_bilinear(up, xs[i].shape[1:3])
        elif j < i:
          y = y + downs[i, j]
      out.append(jax.nn.relu(y))
    return out


class HRNet(nnx.Module):
  """HRNetV2 backbone: (N, H, W, 3) -> 4 branches (N, H/4.., W/4.., C), (.. H/32.., 8C).

  Stem (two 3x3 stride-2 convs), layer1 (4 Bottlenecks, 64 -> 256), stages 2-4 with (1, 4, 3)
  HRModules of 4 BasicBlocks per branch; channels (W, 2W, 4W, 8W).
  """

  def __init__(self, variant: str = 'c', width: int = 48, patch_size: int = 8, encode_rate: int = 4,
               fc_rate: int = 64, *, down: str = '', up: str = '', dtype=jnp.float32,
               remat: bool = False, rngs: nnx.Rngs):
    """`down` / `up` ('' = the variant's) pick the operators; see `Resampling`."""
    if variant not in VARIANTS:
      raise ValueError(f'model.variant must be one of {tuple(VARIANTS)}, got {variant!r}')
    if width not in WIDTHS:
      raise ValueError(f'model.width must be one of {WIDTHS}, got {width!r}')
    self.remat = remat
    resampling = Resampling(down or VARIANTS[variant][0], up or VARIANTS[variant][1], patch_size,
                            encode_rate, fc_rate, dtype, rngs)
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
