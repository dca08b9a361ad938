"""save_model / restore_model round trip and the model-config guard, on the real HRNet-W18."""
from flax import nnx
import jax
import numpy as np
import pytest

from configs import common
from m2mrf_jax import checkpoints
from m2mrf_jax import models

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing: XLA's optimisations only cost time


def _w18(variant='c'):
  config = common.get_config('idrid', variant)
  config.model.width = 18
  return config.model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A W18-c model with random BN statistics, saved as step 3."""
  model_config = _w18()
  model = models.build(model_config, nnx.Rngs(1))
  rng = np.random.default_rng(0)
  state = nnx.state(model, nnx.BatchStat)
  nnx.update(model, jax.tree.map(lambda v: rng.random(v.shape).astype(v.dtype), state))
  directory = tmp_path_factory.mktemp('ckpt')
  checkpoints.save_model(directory, model, model_config, step=3)
  return directory, model, model_config


def test_restore_model_round_trip(saved):
  directory, model, model_config = saved
  restored = checkpoints.restore_model(directory, model_config)
  want = nnx.to_pure_dict(nnx.state(model))
  got = nnx.to_pure_dict(nnx.state(restored))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
  model.eval()
  restored.eval()
  np.testing.assert_array_equal(restored(x), model(x))
  assert checkpoints.read_meta(directory) == {'model': model_config.to_dict(), 'step': 3}


def test_restore_model_compute_options_do_not_matter(saved):
  directory, _, model_config = saved
  other = model_config.copy_and_resolve_references()
  other.dtype, other.remat = 'bfloat16', True
  restored = checkpoints.restore_model(directory, other)
  assert restored is not None


def test_restore_model_refuses_other_variant_or_width(saved):
  directory, _, _ = saved
  wanted = _w18('a')
  wanted.width = 48
  with pytest.raises(ValueError, match=f'checkpoint at {directory} is variant c width 18; '
                                       'config asks for variant a width 48'):
    checkpoints.restore_model(directory, wanted)


def test_restore_model_missing_step_or_directory(saved, tmp_path):
  directory, _, model_config = saved
  with pytest.raises(FileNotFoundError, match='no step 5'):
    checkpoints.restore_model(directory, model_config, step=5)
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    checkpoints.restore_model(tmp_path / 'empty', model_config)
