"""The grading job end to end on a synthetic DDR grading download, over 8 CPU devices.

Train two steps with the grading job (what `m2mrf_jax.main` runs for a grading config), evaluate the
checkpoint again, and grade two photographs with the predict CLI's `run`: metrics.json (against sklearn on the saved predictions' own
confusion matrix), the frozen side branch untouched by training, and predict's probabilities equal to
the evaluation's for the same photograph.
"""
import json

from etils import epath
from flax import nnx
import jax
import numpy as np
from PIL import Image
import pytest
from sklearn import metrics as skm

from configs import grading_demo
from data_pipelines import sources
from m2mrf_jax import checkpoints
from m2mrf_jax.grading import predict
from m2mrf_jax.grading import sian
from m2mrf_jax.grading import train


def _config():
  config = grading_demo.get_config()
  config.model.attention = 'maxpool'  # fewer ops to compile than the conv block
  config.data.synthetic_image_size = (64, 96)
  config.data.synthetic_num_train = 8
  config.data.synthetic_num_test = 7  # DDR: one of them ungradable, dropped
  config.data.image_size = 80
  config.batch_size = 8
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.eval_batch_size = 1
  return config


def test_override_check_uses_the_grading_keys():
  argv = ['--config=configs/grading_demo.py', '--config.data.image_size=96']
  reference = train.reference_config(argv)
  assert reference is not None and reference.task == 'grading'
  assert train.reference_config(['--config=configs/idrid_c.py']) is None
  with pytest.raises(ValueError, match='model.num_classes=5 but the data has 6 grades'):
    config = _config()
    config.data.keep_ungradable = True
    train.check_config(config)


def test_train_evaluate_and_predict(tmp_path):
  assert jax.device_count() == 8
  config = _config()
  workdir = tmp_path / 'run'
  scores = train.train_and_evaluate(config, workdir)
  saved = json.loads((workdir / train.METRICS_FILE).read_text())
  assert saved['num_images'] == 6 and saved['split'] == 'test'
  assert saved['accuracy'] == pytest.approx(scores['accuracy'])
  assert saved['kappa'] == pytest.approx(scores['kappa'])
  # The saved confusion matrix against sklearn's metrics of the pairs it counts.
  confusion = np.array(saved['confusion'])
  true = np.repeat(np.arange(5), confusion.sum(1))
  pred = np.concatenate([np.repeat(np.arange(5), row) for row in confusion])
  assert saved['accuracy'] == pytest.approx(skm.accuracy_score(true, pred))
  if np.isfinite(saved['kappa'] if saved['kappa'] is not None else np.nan):
    assert saved['kappa'] == pytest.approx(
        skm.cohen_kappa_score(true, pred, labels=range(5), weights='quadratic'))
  log = [json.loads(line) for line in (workdir / 'log.jsonl').read_text().splitlines()]
  assert [r['step'] for r in log if 'loss' in r] == [1, 2]
  assert checkpoints.read_meta(workdir)['step'] == 2

  # The frozen side branch is the freshly built segmenter, untouched by the two SGD steps.
  model = train.restore(workdir, config.model)
  fresh = sian.build(config.model, nnx.Rngs(config.seed))
  for a, b in zip(jax.tree.leaves(nnx.state(model.side)), jax.tree.leaves(nnx.state(fresh.side))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                 zip(jax.tree.leaves(nnx.state(model.main)), jax.tree.leaves(nnx.state(fresh.main))))

  again = train.evaluate_checkpoint(config, workdir)
  assert again['confusion'] == scores['confusion']

  # Predict: the same probabilities as the evaluation for the first test photograph.
  data_dir = str(workdir / 'tfds')
  record = sources.raw_source('ddr_grading', 'test', data_dir)[0]
  photo = tmp_path / f'{record["id"].decode()}.jpg'
  photo.write_bytes(record['image'])
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'not a jpeg')
  failed = predict.run(model, config, [str(photo), str(bad)], tmp_path / 'out', batch_size=2)
  assert failed == [str(bad)]
  grade = json.loads((tmp_path / 'out' / f'{photo.stem}_grade.json').read_text())
  _, probs = train.predict_split(model, config, data_dir, 'test')
  np.testing.assert_allclose(list(grade['probabilities'].values()), probs[0], atol=1e-5)
  assert grade['grade'] == int(np.argmax(probs[0]))
  with Image.open(tmp_path / 'out' / f'{photo.stem}_overlay.png') as overlay:
    assert overlay.size == (int(record['width']), int(record['height']))
  rows = (tmp_path / 'out' / 'grades.csv').read_text().splitlines()
  assert rows[0].startswith('name,grade,p_none') and rows[1].startswith(f'{photo.stem},')
  assert epath.Path(tmp_path / 'out' / f'{photo.stem}_prob_MA.png').exists()
