"""save_model / restore_model round trip, the model-config guard and the model card, on the real
HRNet-W18."""
import json
import os
import pathlib
import re
import subprocess
import sys

from absl import logging
from flax import nnx
import jax
import numpy as np
import pytest

from configs import common
from configs import grading_common
from m2mrf_jax import checkpoints
from m2mrf_jax import evaluate
from m2mrf_jax import models

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing: XLA's optimisations only cost time


def _w18_config(variant='c'):
  config = common.get_config('idrid', variant)
  config.model.width = 18
  return config


def _w18(variant='c'):
  return _w18_config(variant).model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A W18-c model with random BN statistics, saved as step 3."""
  config = _w18_config()
  model_config = config.model
  model = models.build(model_config, nnx.Rngs(1))
  rng = np.random.default_rng(0)
  state = nnx.state(model, nnx.BatchStat)
  nnx.update(model, jax.tree.map(lambda v: rng.random(v.shape).astype(v.dtype), state))
  directory = tmp_path_factory.mktemp('ckpt')
  checkpoints.save_model(directory, model, config, step=3)
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


# ---- The model card --------------------------------------------------------------------------


def test_saved_checkpoint_has_a_card_with_the_config_values(saved):
  directory, _, _ = saved
  path = directory / '3' / 'model_card' / 'model_card.json'
  card = json.loads(path.read_text())  # a plain JSON file beside the weights
  config = _w18_config()
  assert card['task'] == 'segmentation'
  assert (card['variant'], card['width'], card['num_classes']) == ('c', 18, 4)
  assert (card['down'], card['up']) == (config.model.down, config.model.up)
  assert card['classes'] == ['EX', 'HE', 'SE', 'MA']
  assert card['dataset'] == 'idrid'
  assert card['img_scale'] == [1440, 960]
  assert card['mean'] == [116.513, 56.437, 16.309] and card['std'] == [80.206, 41.232, 13.293]
  assert card['training_steps'] == 3 and card['num_train_steps'] == 40_000
  assert card['metrics'] == {}
  assert 'not for diagnosis' in card['intended_use']
  assert card['version'] == '0.1.0'
  assert checkpoints.read_card(directory) == card


@pytest.mark.parametrize('field, override, card_value, config_value', [
    ('width', lambda c: c.model.update(width=32), 18, 32),
    ('dataset', lambda c: c.data.update(name='ddr'), "'idrid'", "'ddr'"),
    ('std', lambda c: c.data.update(std=(1.0, 2.0, 3.0)), '[80.206, 41.232, 13.293]', '[1.0, 2.0, 3.0]'),
    ('img_scale', lambda c: c.data.update(img_scale=(1024, 1024)), '[1440, 960]', '[1024, 1024]'),
])
def test_a_contradicting_config_is_refused_naming_both_values(saved, field, override, card_value,
                                                              config_value):
  directory, _, _ = saved
  config = _w18_config()
  override(config)
  with pytest.raises(ValueError, match=rf'contradicts the config: {field} is '
                                       rf'{re.escape(str(card_value))} in the card, '
                                       rf'{re.escape(str(config_value))} in the config'):
    checkpoints.checked_card(directory, config)


def test_checked_card_prints_the_card_and_warns_without_one(saved, tmp_path, caplog):
  directory, model, _ = saved
  caplog.set_level(logging.INFO)
  card = checkpoints.checked_card(directory, _w18_config())
  assert card['width'] == 18
  printed = caplog.text
  assert f'model card of {directory}' in printed and 'variant: c' in printed
  assert 'classes: EX, HE, SE, MA' in printed and 'not for diagnosis' in printed

  # A checkpoint written before cards existed: a warning, not a refusal.
  old = tmp_path / 'old'
  checkpoints.save_model(old, model, _w18_config(), step=1)
  (old / '1' / 'model_card' / 'model_card.json').unlink()
  caplog.clear()
  assert checkpoints.checked_card(old, _w18_config('a')) is None
  assert 'has no model card' in caplog.text


def test_evaluate_prints_the_card_and_refuses_a_contradicting_config(saved, tmp_path, caplog):
  directory, _, _ = saved
  config = _w18_config()
  config.data.mean = (0.0, 0.0, 0.0)
  caplog.set_level(logging.INFO)
  with pytest.raises(ValueError, match=r"mean is \[116.513, 56.437, 16.309\] in the card, "
                                       r"\[0.0, 0.0, 0.0\] in the config"):
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'eval'), checkpoint=str(directory))
  assert f'model card of {directory}' in caplog.text
  assert not (tmp_path / 'eval').exists()  # refused before the data is prepared


@pytest.mark.slow
def test_predict_cli_prints_the_card_and_refuses_a_contradicting_config(saved, tmp_path):
  directory, _, _ = saved
  result = subprocess.run(
      [sys.executable, '-m', 'm2mrf_jax.predict', '--config=configs/ddr_c.py', '--config.model.width=18',
       f'--checkpoint={directory}', f'--output={tmp_path / "out"}', 'x.png'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0
  assert f'model card of {directory}' in result.stderr and 'classes: EX, HE, SE, MA' in result.stderr
  assert "dataset is 'idrid' in the card, 'ddr' in the config" in result.stderr
  assert 'img_scale is [1440, 960] in the card, [1024, 1024] in the config' in result.stderr
  assert not (tmp_path / 'out').exists()


def test_grading_card_holds_the_grades_and_the_side_branch():
  config = grading_common.get_config('ddr_grading')
  card = checkpoints.model_card(config, 7, {'kappa': 0.5, 'confusion': [[1]]})
  assert card['task'] == 'grading' and card['dataset'] == 'ddr_grading'
  assert card['classes'] == ['none', 'mild', 'moderate', 'severe', 'proliferative']
  assert (card['variant'], card['width'], card['num_classes']) == ('c', 48, 5)
  assert card['image_size'] == 896 and card['mean'] == [81.205, 50.636, 21.216]  # DDR segmenter's
  assert card['metrics'] == {'kappa': 0.5} and card['training_steps'] == 7
  checkpoints.check_card('d', card, config)  # its own config passes
  config.model.num_classes = 6
  with pytest.raises(ValueError, match='num_classes is 5 in the card, 6 in the config; classes is'):
    checkpoints.check_card('d', card, config)
