"""torchvision Inception-v3 state_dicts -> the NNX main branch (`inception.InceptionV3`).

The key table: NNX module paths already spell torchvision's keys, so each rule only says what to do
with the layout (first match wins):
  AuxLogits.*                    dropped: the auxiliary classifier is not built
  *.num_batches_tracked          dropped
  *.conv.weight                  torch (O, I, kh, kw) -> HWIO (kh, kw, I, O)
  fc.weight                      torch (out, in) -> (in, out)
  everything else                as is (BN weight / bias / running_mean / running_var, fc.bias)

The ImageNet weights are torchvision's public file `inception_v3_google-0cc3c7bd.pth` (download it
yourself; it is read with `torch.load(weights_only=True)`). Its 1000-class `fc` does not fit a
5-grade head and is skipped by `load_imagenet`.
"""
import re

from absl import logging
from flax import nnx
import jax.numpy as jnp
import numpy as np

from m2mrf_jax import convert as seg_convert

RULES = (
    (re.compile(r'^AuxLogits\.|\.num_batches_tracked$'), 'drop'),
    (re.compile(r'\.conv\.weight$'), 'conv'),
    (re.compile(r'^fc\.weight$'), 'linear'),
    (re.compile(r'.'), 'same'),
)
CLASSIFIER = ('fc.weight', 'fc.bias')


def rule(key):
  """The layout rule of a torchvision key: 'drop', 'conv', 'linear' or 'same'."""
  return next(kind for pattern, kind in RULES if pattern.search(key))


def from_torch(key, value):
  """A torchvision array in the NNX layout."""
  kind = rule(key)
  if kind == 'conv':
    return value.transpose(2, 3, 1, 0)
  if kind == 'linear':
    return value.T
  return value


def to_torch(key, value):
  """An NNX array of `key` in the torchvision layout."""
  kind = rule(key)
  if kind == 'conv':
    return value.transpose(3, 2, 0, 1)
  if kind == 'linear':
    return value.T
  return value


def _variables(module):
  flat = nnx.to_flat_state(nnx.state(module, (nnx.Param, nnx.BatchStat)))
  return {'.'.join(str(k) for k in path): variable for path, variable in flat}


def state_dict(module):
  """The Inception-v3 module's parameters and BN statistics as torchvision keys -> NumPy arrays."""
  return {k: to_torch(k, np.asarray(v[...])) for k, v in _variables(module).items()}


def load_state_dict(module, state_dict_in, skip_classifier=False):
  """Loads a torchvision Inception-v3 state_dict into `module` (an `InceptionV3`), strictly.

  Args:
    module: the NNX `InceptionV3`.
    state_dict_in: torchvision key -> torch tensor or NumPy array (a `module.` prefix is stripped).
    skip_classifier: leave `fc` as it is (an ImageNet head does not fit a grading head).

  Returns:
    The number of tensors loaded.

  Raises:
    ValueError: listing the missing, unexpected and mis-shaped keys, if any.
  """
  loaded = {k.removeprefix('module.'): seg_convert._to_numpy(v)  # pylint: disable=protected-access
            for k, v in state_dict_in.items()}
  loaded = {k: v for k, v in loaded.items() if rule(k) != 'drop'}
  variables = _variables(module)
  if skip_classifier:
    loaded = {k: v for k, v in loaded.items() if k not in CLASSIFIER}
    variables = {k: v for k, v in variables.items() if k not in CLASSIFIER}
  expected = {k: to_torch(k, np.empty(v.shape, np.int8)).shape for k, v in variables.items()}
  missing = sorted(set(expected) - set(loaded))
  unexpected = sorted(set(loaded) - set(expected))
  misshaped = sorted(f'{k}: checkpoint {loaded[k].shape}, model {expected[k]}'
                     for k in set(loaded) & set(expected) if loaded[k].shape != expected[k])
  if missing or unexpected or misshaped:
    parts = [seg_convert._listing(t, ks)  # pylint: disable=protected-access
             for t, ks in (('missing keys', missing), ('unexpected keys', unexpected),
                           ('mis-shaped keys', misshaped)) if ks]
    raise ValueError('state_dict does not fit Inception-v3; ' + '\n'.join(parts))
  for key, variable in variables.items():
    variable[...] = jnp.array(from_torch(key, loaded[key]), variable.dtype, copy=True)
  return len(variables)


def load_imagenet(module, path):
  """Loads torchvision's ImageNet file (`inception_v3_google-0cc3c7bd.pth`) into `module`, fc kept."""
  count = load_state_dict(module, seg_convert.read_pth(path), skip_classifier=True)
  logging.info('Loaded %d Inception-v3 tensors from %s (fc and AuxLogits not loaded).', count, path)
  return count
