"""An independent PyTorch statement of the official M2MRF-HRNetV2 segmentor (test-only code).

Written from CVIU-CSU/M2MRF-Lesion-Segmentation@13af879 (`mmseg/models/utils/m2mrf.py`,
`mmseg/models/backbones/hrnet_m2mrf.py`) and mmsegmentation v0.8 (`backbones/hrnet.py`,
`backbones/resnet.py`, `decode_heads/{fcn_head,decode_head}.py`, `segmentors/encoder_decoder.py`,
`ops/wrappers.py`), in plain `torch.nn` so that `state_dict()` keys equal the official segmentor's.

Variants (the backbone's down/up receptive-field operators):
  base: stock mmseg HRNetV2. Down: 3x3 stride-2 conv + BN (+ ReLU between cascade steps); transitions
    3x3 stride-2 conv + BN + ReLU. Up: 1x1 conv + BN + `Upsample(scale_factor=2^(j-i), 'bilinear',
    align_corners=False)`, whose size is `int(h * 2^(j-i))`; the HRModule then resizes (bilinear,
    align_corners=False) to the target branch size again.
  a: one-step down, one-step up.  b: one-step down, cascade up.
  c: cascade down, one-step up.   d: cascade down, cascade up.
  Every M2MRF variant uses M2MRF(0.5) + BN + ReLU in the new-branch transitions.
"""
import torch
import torch.nn.functional as F
from torch import nn

# variant -> (down, up); None = the stock strided conv / bilinear upsample.
VARIANTS = {
    'base': (None, None),
    'a': ('onestep', 'onestep'),
    'b': ('onestep', 'cascade'),
    'c': ('cascade', 'onestep'),
    'd': ('cascade', 'cascade'),
}

# HRNetV2 stages 2-4: (num_modules, num_branches); 4 BasicBlocks per branch.
STAGES = ((1, 2), (4, 3), (3, 4))


def resize(x, size):
  """Bilinear resize, align_corners=False (mmseg `resize`). x: (N, C, H, W)."""
  return F.interpolate(x, size=tuple(int(s) for s in size), mode='bilinear', align_corners=False)


def conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout):
  return nn.Conv2d(cin, cout, 1, bias=False)


class M2MRFModule(nn.Module):
  """Unfold into p x p patches, two per-patch linears, fold into (p*s) x (p*s) patches."""

  def __init__(self, scale, encode_channels, fc_channels, size):
    super().__init__()
    self.scale = scale
    self.size = size
    self.sample_fc = nn.Conv1d(size * size * encode_channels, fc_channels, 1)
    self.sample_fc1 = nn.Conv1d(fc_channels, int(size * size * scale * scale * encode_channels), 1)

  def forward(self, x):
    """x: (N, C, H, W) with H, W multiples of the patch size -> (N, C, H*s, W*s)."""
    h, w = x.shape[2:]
    v = F.unfold(x, kernel_size=self.size, stride=self.size)  # (N, C*p*p, L), channel-major
    v = self.sample_fc1(self.sample_fc(v))
    k = int(self.size * self.scale)
    return F.fold(v, (int(h * self.scale), int(w * self.scale)), kernel_size=k, stride=k)


class M2MRF(nn.Module):
  """The official operator: pad bottom/right, 1x1 encode, M2MRF_Module, 1x1 decode, crop."""

  def __init__(self, scale, in_channels, out_channels, patch_size=8, encode_rate=4, fc_rate=64):
    super().__init__()
    self.scale = scale
    self.patch_size = patch_size
    enc = int(in_channels / encode_rate)
    fc = int(patch_size * patch_size * enc / fc_rate)
    self.sample_encode_conv = nn.Conv2d(in_channels, enc, 1)
    self.sample = M2MRFModule(scale, enc, fc, patch_size)
    self.sample_decode_conv = nn.Conv2d(enc, out_channels, 1)

  def forward(self, x):
    """x: (N, C_in, H, W) -> (N, C_out, max(int(H*s), 1), max(int(W*s), 1))."""
    h, w = x.shape[2:]
    p = self.patch_size
    x = F.pad(x, [0, (-w) % p, 0, (-h) % p])
    out_h, out_w = max(int(h * self.scale), 1), max(int(w * self.scale), 1)
    x = self.sample_decode_conv(self.sample(self.sample_encode_conv(x)))
    return x[:, :, :out_h, :out_w]


class Upsample(nn.Module):
  """mmseg `Upsample`: bilinear resize to int(size * scale_factor), align_corners=False."""

  def __init__(self, scale_factor):
    super().__init__()
    self.scale_factor = float(scale_factor)

  def forward(self, x):
    return resize(x, [int(t * self.scale_factor) for t in x.shape[-2:]])


class BasicBlock(nn.Module):
  """ResNet basic block (mmseg `BasicBlock`, expansion 1, no downsample in HRNet branches)."""

  def __init__(self, channels):
    super().__init__()
    self.conv1 = conv3x3(channels, channels)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = conv3x3(channels, channels)
    self.bn2 = nn.BatchNorm2d(channels)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + x)


class Bottleneck(nn.Module):
  """ResNet bottleneck (mmseg `Bottleneck`, expansion 4, stride 1), as used by HRNet layer1."""

  def __init__(self, cin, planes):
    super().__init__()
    cout = planes * 4
    self.conv1 = conv1x1(cin, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv1x1(planes, cout)
    self.bn3 = nn.BatchNorm2d(cout)
    self.downsample = nn.Sequential(conv1x1(cin, cout), nn.BatchNorm2d(cout)) if cin != cout else None

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


def down_step(cin, cout, scale, relu, m2mrf_kw):
  """One down path element: (M2MRF(scale) or 3x3 stride-2 conv) + BN [+ ReLU]."""
  op = M2MRF(scale, cin, cout, **m2mrf_kw) if m2mrf_kw is not None else conv3x3(cin, cout, 2)
  layers = [op, nn.BatchNorm2d(cout)]
  if relu:
    layers.append(nn.ReLU())
  return nn.Sequential(*layers)


def fuse_down(cj, ci, steps, mode, m2mrf_kw):
  """fuse_layers[i][j] for j < i (steps = i - j)."""
  if mode == 'onestep':
    return nn.Sequential(down_step(cj, ci, 0.5**steps, False, m2mrf_kw))
  last = steps - 1
  return nn.Sequential(*[
      down_step(cj, ci if k == last else cj, 0.5, k != last, m2mrf_kw) for k in range(steps)])


def fuse_up(cj, ci, steps, mode, m2mrf_kw):
  """fuse_layers[i][j] for j > i (steps = j - i): 1x1 conv + BN, then the upsampler(s)."""
  seq = nn.Sequential(conv1x1(cj, ci), nn.BatchNorm2d(ci))
  if mode is None:
    seq.add_module('2', Upsample(2**steps))
  elif mode == 'onestep':
    seq.add_module('2', M2MRF(2**steps, ci, ci, **m2mrf_kw))
  else:
    for k in range(steps):
      seq.add_module(f'sample_{k}', M2MRF(2, ci, ci, **m2mrf_kw))
  return seq


class HRModule(nn.Module):
  """HRNet module: 4 BasicBlocks per branch, then the all-to-all fuse, sum, ReLU."""

  def __init__(self, channels, down, up, m2mrf_kw):
    super().__init__()
    n = len(channels)
    self.branches = nn.ModuleList(
        [nn.Sequential(*[BasicBlock(c) for _ in range(4)]) for c in channels])
    self.fuse_layers = nn.ModuleList()
    for i in range(n):
      row = nn.ModuleList()
      for j in range(n):
        if j > i:
          row.append(fuse_up(channels[j], channels[i], j - i, up, m2mrf_kw))
        elif j == i:
          row.append(None)
        else:
          row.append(fuse_down(channels[j], channels[i], i - j, down or 'cascade', m2mrf_kw))
      self.fuse_layers.append(row)

  def forward(self, xs):
    xs = [branch(x) for branch, x in zip(self.branches, xs)]
    out = []
    for i, row in enumerate(self.fuse_layers):
      y = xs[i]
      for j, layer in enumerate(row):
        if j > i:
          y = y + resize(layer(xs[j]), xs[i].shape[2:])
        elif j < i:
          y = y + layer(xs[j])
      out.append(F.relu(y))
    return out


def transition(pre, cur, m2mrf_kw):
  """transitionK: 3x3 conv + BN + ReLU where widths change, a down step for the new branch."""
  layers = nn.ModuleList()
  for i, c in enumerate(cur):
    if i < len(pre):
      layers.append(nn.Sequential(conv3x3(pre[i], c), nn.BatchNorm2d(c), nn.ReLU())
                    if pre[i] != c else None)
    else:
      layers.append(nn.Sequential(down_step(pre[-1], c, 0.5, True, m2mrf_kw)))
  return layers


class HRNet(nn.Module):
  """HRNetV2 backbone (mmseg `HRNet` for 'base', the official `HRNet_M2MRF_{A,B,C,D}` otherwise)."""

  def __init__(self, variant, width, patch_size=8, encode_rate=4, fc_rate=64):
    super().__init__()
    down, up = VARIANTS[variant]
    m2mrf_kw = dict(patch_size=patch_size, encode_rate=encode_rate, fc_rate=fc_rate)
    self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(64)
    self.layer1 = nn.Sequential(*[Bottleneck(64 if k == 0 else 256, 64) for k in range(4)])
    pre = [256]
    for s, (num_modules, num_branches) in enumerate(STAGES, start=2):
      cur = [width * 2**b for b in range(num_branches)]
      setattr(self, f'transition{s - 1}', transition(pre, cur, m2mrf_kw if down else None))
      kw = m2mrf_kw if down or up else None
      setattr(self, f'stage{s}', nn.Sequential(*[HRModule(cur, down, up, kw)
                                                for _ in range(num_modules)]))
      pre = cur

  def forward(self, x):
    """x: (N, 3, H, W) -> 4 feature maps at strides 4, 8, 16, 32."""
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    xs = [self.layer1(x)]
    for s in range(2, 5):
      trans = getattr(self, f'transition{s - 1}')
      xs = [xs[i] if t is None else t(xs[-1]) for i, t in enumerate(trans)]  # as mmseg: y_list[-1]
      xs = getattr(self, f'stage{s}')(xs)
    return xs


class ConvModule(nn.Module):
  """mmcv ConvModule: conv (no bias) + BN + ReLU."""

  def __init__(self, cin, cout):
    super().__init__()
    self.conv = conv1x1(cin, cout)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class FCNHead(nn.Module):
  """FCNHead, resize_concat of the 4 branches, one 1x1 ConvModule, no dropout, 1x1 conv_seg."""

  def __init__(self, in_channels, num_classes):
    super().__init__()
    self.convs = nn.Sequential(ConvModule(in_channels, in_channels))
    self.conv_seg = nn.Conv2d(in_channels, num_classes, 1)

  def forward(self, xs):
    x = torch.cat([resize(f, xs[0].shape[2:]) for f in xs], dim=1)
    return self.conv_seg(self.convs(x))


class EncoderDecoder(nn.Module):
  """The segmentor: backbone, decode head, logits resized to the input size (encode_decode)."""

  def __init__(self, variant, width, num_classes):
    super().__init__()
    self.backbone = HRNet(variant, width)
    self.decode_head = FCNHead(width * 15, num_classes)

  def forward(self, x):
    """x: (N, 3, H, W) -> logits (N, num_classes, H, W)."""
    return resize(self.decode_head(self.backbone(x)), x.shape[2:])


def build_torch_model(variant, width=48, num_classes=4):
  """The official segmentor for `variant` in ('base', 'a', 'b', 'c', 'd')."""
  if variant not in VARIANTS:
    raise ValueError(f'variant must be one of {tuple(VARIANTS)}, got {variant!r}')
  return EncoderDecoder(variant, width, num_classes)


@torch.no_grad()
def randomize_(model, seed=0, calibration_size=(128, 160)):
  """Random parameters and random BN running statistics on the scale of the real activations.

  Conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), BN weight ~ U[0.5, 1.5], BN bias ~ N(0, 0.1).
  The running statistics are first set to the batch statistics of one train-mode forward of a random
  batch (so that eval-mode activations stay O(1) through the whole depth), then perturbed per channel:
  running_mean += N(0, 0.2) * std, running_var *= U[0.6, 1.6]. Works on a segmentor or a backbone.
  Leaves `model` in eval mode with num_batches_tracked = 0; returns it.
  """
  g = torch.Generator().manual_seed(seed)

  def normal(shape, std):
    return torch.randn(shape, generator=g) * std

  def uniform(shape, lo, hi):
    return torch.rand(shape, generator=g) * (hi - lo) + lo

  bns = []
  for m in model.modules():
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
      m.weight.copy_(normal(m.weight.shape, m.weight[0].numel() ** -0.5))
      if m.bias is not None:
        m.bias.copy_(normal(m.bias.shape, 0.1))
    elif isinstance(m, nn.BatchNorm2d):
      m.weight.copy_(uniform(m.weight.shape, 0.5, 1.5))
      m.bias.copy_(normal(m.bias.shape, 0.1))
      m.reset_running_stats()
      m.momentum = None  # cumulative average: after one batch, the batch statistics exactly
      bns.append(m)
  model.train()
  model(normal((2, 3, *calibration_size), 1.0))
  for m in bns:
    m.momentum = 0.1
    m.num_batches_tracked.zero_()
    m.running_mean.add_(normal(m.running_mean.shape, 0.2) * m.running_var.sqrt())
    m.running_var.mul_(uniform(m.running_var.shape, 0.6, 1.6))
  return model.eval()


def build_msra_backbone_state_dict(width=48, seed=0):
  """An ImageNet HRNetV2-W{width}-C checkpoint as MSRA distributes it (hrnetv2_w48-d2186c55.pth).

  Plain keys (no `backbone.` prefix) of the stock strided-conv HRNet, random values, with the
  classification extras (`incre_modules`, `downsamp_modules`, `final_layer`, `classifier`) that
  loaders must ignore. Returns dict name -> torch.Tensor.
  """
  backbone = randomize_(HRNet('base', width), seed)
  sd = dict(backbone.state_dict())
  g = torch.Generator().manual_seed(seed + 1)
  extras = {
      'incre_modules.0.0.conv1.weight': (32, width, 1, 1),
      'incre_modules.0.0.bn1.running_var': (32,),
      'downsamp_modules.0.0.weight': (256, 128, 3, 3),
      'downsamp_modules.0.0.bias': (256,),
      'final_layer.0.weight': (2048, 1024, 1, 1),
      'final_layer.1.running_mean': (2048,),
      'classifier.weight': (1000, 2048),
      'classifier.bias': (1000,),
  }
  sd.update({k: torch.rand(shape, generator=g) for k, shape in extras.items()})
  return sd


def official_backbone_load(model_sd, ckpt_sd):
  """mmcv `load_checkpoint(backbone, strict=False)` on plain backbone keys.

  Args:
    model_sd: the backbone's own state_dict (no prefix).
    ckpt_sd: the checkpoint's state_dict.

  Returns:
    (loaded, skipped): keys copied (same name and shape), keys skipped for a shape mismatch.
  """
  loaded, skipped = [], []
  for k, v in ckpt_sd.items():
    if k in model_sd:
      (loaded if tuple(model_sd[k].shape) == tuple(v.shape) else skipped).append(k)
  return loaded, skipped
