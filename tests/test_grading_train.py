"""The grading job on synthetic DDR grading downloads, over 8 CPU devices.

The loop's plumbing (resume, logs, checkpoints, metrics.json, the frozen side branch) runs a tiny
stand-in SiAN (`tests.tiny_model.TinySiAN`); one slow run trains the real SiAN (Inception-v3 + the
W18 segmenter) two steps, evaluates its checkpoint again and grades photographs with the predict CLI's
`run`.
"""
import json
import os
import signal

from etils import epath
from flax import nnx
import jax
import numpy as np
from PIL import Image
import pytest
from sklearn import metrics as skm

from configs import grading_demo
from data_pipelines import grading_pipeline
from data_pipelines import sources
from m2mrf_jax import checkpoints
from m2mrf_jax.grading import predict
from m2mrf_jax.grading import sian
from m2mrf_jax.grading import train
from tests.tiny_model import TinySiAN

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing: XLA's optimisations only cost time


def _config(image_size=32):
  config = grading_demo.get_config()
  config.data.synthetic_image_size = (image_size, image_size * 3 // 2)
  config.data.synthetic_num_train = 8
  config.data.synthetic_num_test = 7  # DDR: one of them ungradable, dropped
  config.data.image_size = image_size
  config.batch_size = 8
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 100
  config.learning_rate = 0.1
  config.eval_batch_size = 1
  return config


def _leaves(module):
  state = nnx.state(module, nnx.Not(nnx.RngState))  # parameters and BN statistics
  return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(state))]


def _check_metrics_json(workdir, scores):
  saved = json.loads((workdir / train.METRICS_FILE).read_text())
  assert saved['num_images'] == 6 and saved['split'] == 'test'
  assert saved['accuracy'] == pytest.approx(scores['accuracy'])
  # The saved confusion matrix against sklearn's metrics of the pairs it counts.
  confusion = np.array(saved['confusion'])
  true = np.repeat(np.arange(5), confusion.sum(1))
  pred = np.concatenate([np.repeat(np.arange(5), row) for row in confusion])
  assert saved['accuracy'] == pytest.approx(skm.accuracy_score(true, pred))
  if saved['kappa'] is not None:
    assert saved['kappa'] == pytest.approx(
        skm.cohen_kappa_score(true, pred, labels=range(5), weights='quadratic'))


def test_preempt_and_resume_is_bit_exact_and_reports(tmp_path, monkeypatch):
  monkeypatch.setattr(sian, 'build', TinySiAN)
  assert jax.device_count() == 8
  config = _config()
  reference = train.train_and_evaluate(config, tmp_path / 'uninterrupted')

  real_iterator = grading_pipeline.train_iterator

  def sigterm_in_step_two(*args, **kwargs):
    for i, batch in enumerate(real_iterator(*args, **kwargs)):
      if i == 1 + 2:  # the loop reads two batches ahead of the step (mesh.prefetch)
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(grading_pipeline, 'train_iterator', sigterm_in_step_two)
  workdir = tmp_path / 'preempted'
  assert train.train_and_evaluate(config, workdir) is None
  assert checkpoints.read_meta(workdir)['step'] == 2
  monkeypatch.setattr(grading_pipeline, 'train_iterator', real_iterator)
  resumed = train.train_and_evaluate(config, workdir)

  assert resumed['confusion'] == reference['confusion']
  for a, b in zip(_leaves(train.restore(workdir, config.model)),
                  _leaves(train.restore(tmp_path / 'uninterrupted', config.model))):
    np.testing.assert_array_equal(a, b)
  _check_metrics_json(workdir, resumed)
  log = [json.loads(line) for line in (tmp_path / 'uninterrupted' / 'log.jsonl').read_text().splitlines()]
  assert [r['step'] for r in log if 'loss' in r] == [2, 4]
  assert all(np.isfinite(r['loss']) and 0 <= r['train_accuracy'] <= 1 for r in log if 'loss' in r)
  assert log[-1]['test/accuracy'] == pytest.approx(reference['accuracy'])
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['task'] == 'grading' and saved['data']['image_size'] == 32

  # The frozen side branch is the freshly built one; the main branch moved.
  model = train.restore(workdir, config.model)
  fresh = TinySiAN(config.model, nnx.Rngs(config.seed))
  for a, b in zip(_leaves(model.side), _leaves(fresh.side)):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(model.fc), _leaves(fresh.fc)))
  assert train.evaluate_checkpoint(config, workdir)['confusion'] == resumed['confusion']


def test_config_errors(tmp_path):
  config = _config()
  config.data.keep_ungradable = True
  with pytest.raises(ValueError, match='model.num_classes=5 but the data has 6 grades'):
    train.train_and_evaluate(config, tmp_path)
  config = _config()
  config.batch_size = 6
  with pytest.raises(ValueError, match='batch_size=6 must be a multiple of the 8 devices'):
    train.train_and_evaluate(config, tmp_path)
  assert not list(epath.Path(tmp_path).iterdir())  # nothing prepared or written


@pytest.mark.slow
def test_real_sian_train_evaluate_and_predict(tmp_path):
  config = _config(image_size=80)
  config.model.attention = 'maxpool'  # fewer ops to compile than the conv block
  config.num_train_steps = 2
  config.log_every_steps = 1
  workdir = tmp_path / 'run'
  scores = train.train_and_evaluate(config, workdir)
  _check_metrics_json(workdir, scores)
  assert checkpoints.read_meta(workdir)['step'] == 2

  # The frozen side branch is the freshly built segmenter, untouched by the two SGD steps.
  model = train.restore(workdir, config.model)
  fresh = sian.build(config.model, nnx.Rngs(config.seed))
  for a, b in zip(_leaves(model.side), _leaves(fresh.side)):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(model.main), _leaves(fresh.main)))

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
