"""mmsegmentation / MSRA HRNet state_dicts <-> the NNX model, and a CLI writing an orbax checkpoint.

Module paths and leaf names of the NNX model already spell the mmseg keys
(`backbone.stage2.0.fuse_layers.0.1.sample_0.sample.sample_fc.weight`), so conversion is a layout
change per leaf:
  conv weight                  torch (O, I, kh, kw)   <-> HWIO (kh, kw, I, O)
  M2MRF sample_fc.weight       torch (F, C p p, 1)    <-> (p, p, C, F)   [torch patches are (c, ky, kx)]
  M2MRF sample_fc1.weight      torch (C q q, F, 1)    <-> (F, q, q, C)
  M2MRF sample_fc1.bias        torch (C q q,)         <-> (q, q, C)
  everything else (biases, BN weight/bias/running_mean/running_var) unchanged.
BN `num_batches_tracked` counters are dropped.

  python -m m2mrf_jax.convert --config=configs/idrid_c.py --input=model.pth --output=DIR \
      [--backbone_only]
"""
from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from m2mrf_jax import hrnet

# Keys of the MSRA ImageNet classifier that the segmentation backbone does not have.
CLASSIFIER_EXTRAS = ('incre_modules.', 'downsamp_modules.', 'final_layer.', 'classifier.')
_PREFIXES = ('backbone.', 'decode_head.')


def _kind(key, ndim):
  if key.endswith('sample.sample_fc.weight'):
    return 'fc'
  if key.endswith('sample.sample_fc1.weight'):
    return 'fc1'
  if key.endswith('sample.sample_fc1.bias'):
    return 'fc1_bias'
  return 'conv' if ndim == 4 else 'same'


def to_torch(key, value):
  """The NNX array of `key` in the PyTorch layout."""
  value = np.asarray(value)
  kind = _kind(key, value.ndim)
  if kind == 'fc':
    p, _, c, f = value.shape
    return value.transpose(3, 2, 0, 1).reshape(f, c * p * p, 1)
  if kind == 'fc1':
    f, q, _, c = value.shape
    return value.transpose(3, 1, 2, 0).reshape(c * q * q, f, 1)
  if kind == 'fc1_bias':
    return value.transpose(2, 0, 1).reshape(-1)
  if kind == 'conv':
    return value.transpose(3, 2, 0, 1)
  return value


def from_torch(key, value, shape):
  """The PyTorch array of `key` in the NNX layout `shape` (which it must fit, see `torch_shape`)."""
  kind = _kind(key, len(shape))
  if kind == 'fc':
    p, _, c, f = shape
    return value[:, :, 0].reshape(f, c, p, p).transpose(2, 3, 1, 0)
  if kind == 'fc1':
    f, q, _, c = shape
    return value[:, :, 0].reshape(c, q, q, f).transpose(3, 1, 2, 0)
  if kind == 'fc1_bias':
    q, _, c = shape
    return value.reshape(c, q, q).transpose(1, 2, 0)
  if kind == 'conv':
    return value.transpose(2, 3, 1, 0)
  return value


def torch_shape(key, shape):
  """The PyTorch shape of the NNX leaf `key` of shape `shape`."""
  return to_torch(key, np.empty(shape, np.int8)).shape


def _variables(model):
  """mmseg key -> NNX Variable, for every parameter and BN statistic of `model`."""
  flat = nnx.to_flat_state(nnx.state(model))
  return {'.'.join(str(k) for k in path): variable for path, variable in flat}


def _to_numpy(value):
  if type(value).__module__.startswith('torch'):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _normalize(state_dict_in, add_prefix):
  """NumPy values, no `num_batches_tracked`; plain (backbone) keys get `backbone.` if `add_prefix`."""
  out = {k: _to_numpy(v) for k, v in state_dict_in.items() if not k.endswith('num_batches_tracked')}
  if add_prefix and not any(k.startswith(_PREFIXES) for k in out):
    out = {f'backbone.{k}': v for k, v in out.items()}
  return out


def _first_present(shapes, prefix, probes):
  """The name of the first (key suffix, name) probe whose `prefix + suffix` is in `shapes`, else '?'."""
  return next((name for suffix, name in probes if prefix + suffix in shapes), '?')


def describe(shapes):
  """'variant c / width 48 / 4 classes' from mmseg keys -> torch shapes (parts it cannot tell are '?')."""
  down = _first_present(shapes, 'backbone.stage3.0.fuse_layers.2.0.', (
      ('1.0.sample_encode_conv.weight', 'm2mrf_cascade'),
      ('0.0.sample_encode_conv.weight', 'm2mrf_onestep'), ('0.0.weight', 'strideconv')))
  up = _first_present(shapes, 'backbone.stage2.0.fuse_layers.0.1.', (
      ('sample_0.sample_encode_conv.weight', 'm2mrf_cascade'),
      ('2.sample_encode_conv.weight', 'm2mrf_onestep'), ('0.weight', 'bilinear')))
  variant = {paths: name for name, paths in hrnet.VARIANTS.items()}.get((down, up), '?')
  width = shapes.get('backbone.stage2.0.branches.0.0.conv1.weight', ('?',))[0]
  text = f'variant {variant} / width {width}'
  if 'decode_head.conv_seg.weight' in shapes:
    text += f' / {shapes["decode_head.conv_seg.weight"][0]} classes'
  return text


def _listing(title, keys, limit=20):
  shown = '\n  '.join(keys[:limit])
  more = f'\n  ... and {len(keys) - limit} more' if len(keys) > limit else ''
  return f'{len(keys)} {title}:\n  {shown}{more}'


def load_state_dict(model, state_dict_in):
  """Loads an mmseg state_dict (full segmentor, or backbone only) into `model`, strictly.

  Every value is replaced, so `model` may be abstract (`nnx.eval_shape` of `models.build`): bonsai's
  way of building a converted model without initialising it first.

  Args:
    model: the NNX segmentor of `models.build`, concrete or abstract.
    state_dict_in: mmseg key -> NumPy array or torch tensor; keys with `backbone.`/`decode_head.`
      prefixes, or plain backbone keys. A state_dict without `decode_head.` keys loads the backbone.

  Raises:
    ValueError: the checkpoint is another variant/width, or keys are missing, unexpected or mis-shaped.
  """
  loaded = _normalize(state_dict_in, add_prefix=True)
  variables = _variables(model)
  backbone_only = not any(k.startswith('decode_head.') for k in loaded)
  expected = {k: torch_shape(k, v.shape) for k, v in variables.items()
              if not backbone_only or k.startswith('backbone.')}
  got = {k: v.shape for k, v in loaded.items()}
  if describe(got) != describe(expected) and '?' not in describe(got):
    raise ValueError(f'checkpoint is {describe(got)}, config says {describe(expected)}')
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  misshaped = sorted(f'{k}: checkpoint {got[k]}, model {expected[k]}'
                     for k in set(got) & set(expected) if tuple(got[k]) != tuple(expected[k]))
  if missing or unexpected or misshaped:
    parts = [_listing(t, ks) for t, ks in (('missing keys', missing), ('unexpected keys', unexpected),
                                           ('mis-shaped keys', misshaped)) if ks]
    raise ValueError('state_dict does not fit the model; ' + '\n'.join(parts))
  unfilled = sorted(k for k, v in variables.items()
                    if k not in expected and isinstance(v.get_value(), jax.ShapeDtypeStruct))
  if unfilled:
    raise ValueError('the model is abstract and the state_dict holds no decode_head: '
                     + _listing('keys would have no value', unfilled))
  for key in expected:
    variable = variables[key]
    variable.set_value(jnp.array(from_torch(key, loaded[key], variable.shape), variable.dtype, copy=True))


def load_pretrained_backbone(model, state_dict_in):
  """Loads the MSRA ImageNet HRNet checkpoint into `model.backbone` as mmcv `strict=False` does.

  Keys the backbone lacks (classifier extras included) are ignored; missing keys keep their init;
  tensors whose shape differs are skipped.

  Args:
    model: the NNX segmentor of `models.build`.
    state_dict_in: plain backbone keys (or `backbone.`-prefixed) -> NumPy arrays or torch tensors.

  Returns:
    The checkpoint keys skipped for a shape mismatch.
  """
  loaded = _normalize(state_dict_in, add_prefix=False)
  loaded = {k.removeprefix('backbone.'): v for k, v in loaded.items()
            if not k.startswith(CLASSIFIER_EXTRAS)}
  variables = {k.removeprefix('backbone.'): v for k, v in _variables(model).items()
               if k.startswith('backbone.')}
  skipped, count = [], 0
  for key in sorted(set(loaded) & set(variables)):
    variable, value = variables[key], loaded[key]
    shape = torch_shape(key, variable.shape)
    if value.shape != shape:
      skipped.append(key)
      continue
    variable[...] = jnp.array(from_torch(key, value, variable.shape), variable.dtype, copy=True)
    count += 1
  logging.info('loaded %d backbone tensors, skipped %d mis-shaped (%s); %d model tensors keep '
               'their init', count, len(skipped), ', '.join(skipped), len(variables) - count)
  return skipped


def read_pth(path):
  """Reads a PyTorch checkpoint safely (weights_only) as mmseg key -> NumPy array.

  Unwraps `state_dict` / `model` wrappers and strips a DataParallel `module.` prefix.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('reading .pth files needs PyTorch: pip install "m2mrf-jax[convert]" '
                      '(torch==2.13.0)') from e
  checkpoint = torch.load(str(path), map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
      checkpoint = checkpoint[wrapper]
      break
  if not isinstance(checkpoint, dict):
    raise ValueError(f'{path} holds a {type(checkpoint).__name__}, not a state_dict')
  return {k.removeprefix('module.'): _to_numpy(v) for k, v in checkpoint.items()}


def _define_flags():
  """Command-line flags; defined only when run as a script, so importing this module defines none."""
  config_flags.DEFINE_config_file('config', None, 'Config file (its model section is used).')
  flags.DEFINE_string('input', None, 'The .pth checkpoint to convert.')
  flags.DEFINE_string('output', None, 'Directory of the orbax checkpoint to write.')
  flags.DEFINE_bool('backbone_only', False,
                    'Input is the MSRA ImageNet HRNet (loaded as mmcv strict=False).')
  flags.mark_flags_as_required(['config', 'input', 'output'])


def main(argv):
  del argv
  from m2mrf_jax import checkpoints, console, models  # pylint: disable=g-import-not-at-top
  cfg = flags.FLAGS
  console.setup(cfg.verbosity)
  config = cfg.config
  state = read_pth(cfg.input)
  if cfg.backbone_only:  # the rest of the model keeps its fresh initialisation
    model = models.build(config.model, nnx.Rngs(config.get('seed', 0)))
    load_pretrained_backbone(model, state)
  else:
    model = nnx.eval_shape(lambda: models.build(config.model, nnx.Rngs(0)))
    load_state_dict(model, state)
  checkpoints.save_model(cfg.output, model, config)
  logging.info('wrote %s', cfg.output)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
