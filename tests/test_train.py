"""The training job on 8 fake CPU devices: sharding, global BN, accumulation, resume, guards, logs.

A tiny conv + BN segmenter stands in for HRNet (what is tested is the loop, not the network);
the data is an in-memory grain dataset whose batch k, as the real one's, depends only on (seed, k),
and evaluation is a stand-in function, both passed to `train.train`.
"""
import functools
import io
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys

from flax import nnx
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import orbax.checkpoint as ocp
import pytest

from configs import common
from data_pipelines import transforms
from m2mrf_jax import checkpoints
from m2mrf_jax import chrono
from m2mrf_jax import losses
from m2mrf_jax import mesh as mesh_lib
from m2mrf_jax import models
from m2mrf_jax import summary
from m2mrf_jax import train
from tests.tb_events import read_events

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing: XLA's optimisations only cost time
from tests.tiny_model import TinySegmenter

SIZE = 8  # image side
AHEAD = 2  # the loop's feed (mesh.prefetch) reads two batches ahead of the step


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
  monkeypatch.setattr(models, 'build', TinySegmenter)


def _config(**overrides):
  config = common.get_config('idrid', 'c')
  config.model.width = 4
  config.batch_size = 8
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.learning_rate = 0.1
  config.min_learning_rate = 0.01
  config.update(overrides)
  return config


def _batch(seed, n=8):
  """A batch as `pipeline.train_iterator`'s: uint8 pixels and labels, 0 beyond each crop's size."""
  rng = np.random.default_rng(seed)
  image_size = rng.integers(SIZE // 2, SIZE + 1, (n, 2)).astype(np.int32)
  inside = ((np.arange(SIZE)[None, :, None] < image_size[:, :1, None]) &
            (np.arange(SIZE)[None, None, :] < image_size[:, None, 1:]))[..., None]
  image = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8) * inside
  label = (rng.random((n, SIZE, SIZE, 4)) < 0.3).astype(np.uint8) * inside
  return {'image': image.astype(np.uint8), 'image_size': image_size, 'label': label.astype(np.uint8)}


def _host_normalised(batch, data_config):
  """The former input path: each crop normalised on the host (mmcv's float32 Normalize), then Pad 0."""
  return np.stack([transforms.pad_to(transforms.normalize(image[:h, :w], data_config.mean,
                                                          data_config.std), image.shape[:2])
                   for image, (h, w) in zip(batch['image'], batch['image_size'])])


def _one_device_mesh():
  return jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])


def _run_steps(config, mesh, batches):
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = train.make_train_step(graphdef, losses.dice_loss, mesh, config.data.mean, config.data.std)
  out = []
  for batch in batches:
    micro_losses = []
    for micro in train.micro_batches(batch, config.grad_accum_steps):
      state, loss = step(state, mesh_lib.global_batch(mesh, micro))
      micro_losses.append(float(loss))
    out.append(np.mean(micro_losses))
  nnx.update((model, optimizer), state)
  return model, out


def _leaves(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))]


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() == 8
  config, batches = _config(), [_batch(0), _batch(1)]
  sharded, sharded_losses = _run_steps(config, mesh_lib.make_mesh(), batches)
  single, single_losses = _run_steps(config, _one_device_mesh(), batches)
  assert sharded.conv.kernel[...].sharding.is_fully_replicated
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-6)
  for a, b in zip(_leaves(sharded), _leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(_leaves(sharded)[0], _leaves(models.build(config.model, nnx.Rngs(0)))[0])


def test_initial_state_is_replicated_on_every_device():
  config = _config()
  model, optimizer = train.create_model_and_optimizer(config, mesh_lib.make_mesh())
  for leaf in jax.tree.leaves(nnx.state((model, optimizer))):
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated


def test_batchnorm_statistics_are_over_the_global_batch():
  config, batch = _config(), _batch(2)
  model, _ = _run_steps(config, mesh_lib.make_mesh(), [batch])
  initial = models.build(config.model, nnx.Rngs(config.seed))
  features = np.asarray(initial.conv(_host_normalised(batch, config.data)), np.float64)  # (8, H, W, width)
  whole_mean = features.mean(axis=(0, 1, 2))
  whole_var = features.var(axis=(0, 1, 2))
  np.testing.assert_allclose(model.bn.mean[...], 0.1 * whole_mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(model.bn.var[...], 0.9 + 0.1 * whole_var, rtol=1e-5)
  per_shard_mean = features[:1].mean(axis=(0, 1, 2))  # one image per device
  assert not np.allclose(model.bn.mean[...], 0.1 * per_shard_mean, rtol=1e-2)


def test_gradient_accumulation_averages_micro_batches():
  # Micro-batch i takes rows i, i + accum, ...: repeating each row twice makes both micro-batches
  # equal to `half`, so the update equals one step on `half` and BN statistics are updated twice.
  half = _batch(3)
  doubled = {k: np.repeat(v, 2, axis=0) for k, v in half.items()}
  accumulated, acc_losses = _run_steps(_config(batch_size=16, grad_accum_steps=2),
                                       mesh_lib.make_mesh(), [doubled])
  plain, plain_losses = _run_steps(_config(), mesh_lib.make_mesh(), [half])
  np.testing.assert_allclose(acc_losses, plain_losses, rtol=1e-6)
  for name in ('conv', 'head'):
    np.testing.assert_allclose(getattr(accumulated, name).kernel[...],
                               getattr(plain, name).kernel[...], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(accumulated.bn.mean[...], 1.9 * plain.bn.mean[...], rtol=1e-5)


def test_chrono_leaves_out_the_first_step_and_pauses(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(chrono.time, 'perf_counter', lambda: now[0])
  clock = chrono.Chrono(num_steps=100)
  now[0] = 30.0  # the first step: compilation
  clock.step_done(1)
  assert clock.measure(1) == (None, None)
  for step in range(2, 11):  # 9 steps of 2 s, and a 50 s pause
    now[0] += 2.0
    clock.step_done(step)
    if step == 5:
      with clock.paused():
        now[0] += 50.0
  steps_per_sec, eta = clock.measure(10)
  assert steps_per_sec == pytest.approx(0.5) and eta == pytest.approx(180.0)
  now[0] += 4.0
  assert clock.measure(11)[0] == pytest.approx(0.25)  # a new window from step 10


# ---- The whole job: train.train with in-memory data and a stand-in evaluation ----------------


def _train_data(config, hook=None):
  """`train_data` over 20 in-memory examples: global batch k depends on (seed, k) alone, as the
  real pipeline's; `hook(n, batch)` sees (and may change) the n-th batch the iterator yields."""
  examples = [{k: v[0] for k, v in _batch(i, 1).items()} for i in range(20)]

  def train_data(*, start_step, rows):
    assert rows == tuple(range(config.batch_size))  # one process: every row
    dataset = (grain.MapDataset.source(examples).seed(config.seed).shuffle().repeat()
               .batch(config.batch_size))[start_step:].to_iter_dataset()
    if hook is not None:
      calls = []

      def counted(batch):
        calls.append(1)
        return hook(len(calls), batch)
      dataset = dataset.map(counted)
    return iter(dataset)
  return train_data


def _evaluate(model, step, writer):
  del step, writer
  score = float(jnp.mean(jax.nn.sigmoid(model.head.bias[...])))
  return {'mAUPR': score, 'mIoU': score / 2, 'mF1': score / 3}


def _train(config, workdir, hook=None):
  return train.train(config, str(workdir), _train_data(config, hook), _evaluate)


def _final_state(workdir, config):
  model, optimizer = train.create_model_and_optimizer(config, mesh_lib.make_mesh())
  with checkpoints.TrainCheckpointer(workdir, config, handle_sigterm=False) as ckpt:
    step = ckpt.restore(model, optimizer)
  return step, _leaves(model) + [np.asarray(x) for x in jax.tree.leaves(
      nnx.to_pure_dict(nnx.state(optimizer)))]


def test_kill_and_resume_is_bit_exact(tmp_path):
  config = _config()
  reference = _train(config, tmp_path / 'uninterrupted')

  def kill_at_step_5(call, local):
    if call == 5 + AHEAD:  # read when step 5 asks for its batch
      raise KeyboardInterrupt('killed')
    return local
  with pytest.raises(KeyboardInterrupt):
    _train(config, tmp_path / 'killed', kill_at_step_5)
  assert checkpoints.read_meta(tmp_path / 'killed')['step'] == 4
  resumed = _train(config, tmp_path / 'killed')

  def sigterm_at_step_3(call, local):
    if call == 3 + AHEAD:
      os.kill(os.getpid(), signal.SIGTERM)
    return local
  assert _train(config, tmp_path / 'preempted', sigterm_at_step_3) is None
  assert checkpoints.read_meta(tmp_path / 'preempted')['step'] == 3
  _train(config, tmp_path / 'preempted')

  assert resumed == reference
  step, want = _final_state(tmp_path / 'uninterrupted', config)
  assert step == 6
  for workdir in ('killed', 'preempted'):
    step, got = _final_state(tmp_path / workdir, config)
    assert step == 6
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)

  records = [json.loads(line) for line in open(tmp_path / 'uninterrupted' / 'log.jsonl')]
  assert [r['step'] for r in records if 'loss' in r] == [2, 4, 6]
  np.testing.assert_allclose([r['lr'] for r in records if 'lr' in r],
                             [losses.poly_schedule(config)(s - 1) for s in (2, 4, 6)], rtol=1e-6)
  assert records[-1]['mAUPR'] == reference['mAUPR']
  saved = ml_collections.ConfigDict(json.loads((tmp_path / 'uninterrupted' / 'config.json').read_text()))
  assert saved.batch_size == 8 and saved.model.width == 4 and tuple(saved.data.crop_size) == (960, 1440)


def test_logged_loss_is_the_mean_over_the_window(tmp_path):
  config = _config(num_train_steps=4, log_every_steps=4, checkpoint_every_steps=100)
  batches = []
  _train(config, tmp_path, lambda call, batch: batches.append(batch) or batch)
  (record,) = [json.loads(line) for line in open(tmp_path / 'log.jsonl') if 'loss' in line]
  model, optimizer = train.create_model_and_optimizer(config, mesh_lib.make_mesh())
  graphdef, state = nnx.split((model, optimizer))
  step = train.make_train_step(graphdef, losses.dice_loss, mesh_lib.make_mesh(), config.data.mean,
                               config.data.std)
  assert len(batches) == 4 + AHEAD  # read ahead, never used
  step_losses = []
  for batch in batches[:4]:
    state, loss = step(state, mesh_lib.global_batch(mesh_lib.make_mesh(), batch))
    step_losses.append(float(loss))
  assert record['loss'] == pytest.approx(np.mean(step_losses), rel=1e-6)


def _former_train_step(graphdef, loss_fn, mesh):
  """The step before issue 12 (commit fbf78ad), as written then: it takes the host-normalised image."""
  replicated = mesh_lib.replicated(mesh)

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(replicated, replicated))
  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_of(model):
      return loss_fn(model(batch['image']), batch['label'].astype(jnp.float32))

    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return train_step


def test_device_normalisation_logs_the_losses_of_host_normalisation(tmp_path):
  # The loop feeds uint8 pixels, normalised in the step; the former loop fed the host's float32
  # normalisation (`_host_normalised`) to `_former_train_step`. The model inputs are equal bit for bit
  # (test_data_transforms), and so are the losses (also measured with XLA's full optimisation), summed
  # on device as the loop sums them: the tolerance is 0.
  config = _config(num_train_steps=4, log_every_steps=2, checkpoint_every_steps=100,
                   grad_accum_steps=2, batch_size=16)
  batches = []
  _train(config, tmp_path, lambda call, batch: batches.append(batch) or batch)
  logged = [json.loads(line)['loss'] for line in open(tmp_path / 'log.jsonl') if 'loss' in line]
  mesh = mesh_lib.make_mesh()
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = _former_train_step(graphdef, losses.dice_loss, mesh)
  former = []
  for window in (batches[:2], batches[2:4]):
    loss_sum = 0.0
    for batch in window:
      host = {'image': _host_normalised(batch, config.data), 'label': batch['label']}
      for micro in train.micro_batches(host, config.grad_accum_steps):
        state, loss = step(state, mesh_lib.global_batch(mesh, micro))
        loss_sum = loss_sum + loss
    former.append(float(loss_sum) / 4)
  assert (np.asarray([b['image_size'] for b in batches[:4]]) < SIZE).any()  # padded crops
  assert logged == former and len(set(former)) == 2


def test_prefetch_puts_two_batches_ahead_in_order():
  read, put = [], []

  def source():
    for i in range(5):
      read.append(i)
      yield i

  def put_fn(batch):
    put.append(batch)
    return -batch
  got = []
  for item in mesh_lib.prefetch(source(), put_fn):
    got.append(item)
    assert put == read == list(range(min(len(got) + 2, 5)))  # step k: k + 1, k + 2 already put
  assert got == [0, -1, -2, -3, -4]
  mesh = mesh_lib.make_mesh()
  (first,) = itertools.islice(mesh_lib.prefetch(iter([_batch(0)]), functools.partial(
      mesh_lib.global_batch, mesh)), 1)
  assert first['image'].dtype == np.uint8 and first['image'].sharding == mesh_lib.data_sharding(mesh)


def test_nan_loss_stops_within_the_window_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  # uint8 inputs cannot be NaN: the loss is NaN on a batch whose labels are marked with a 2.
  dice = losses.get_loss_fn(_config())
  monkeypatch.setattr(losses, 'get_loss_fn', lambda config: lambda logits, labels: jnp.where(
      labels.max() > 1, jnp.nan, dice(logits, labels)))

  def nan_at_step_3(call, local):
    return {**local, 'label': local['label'] * 2} if call == 3 else local
  with pytest.raises(FloatingPointError, match=r'loss is nan within steps \[3, 4\].*step 2'):
    _train(_config(), tmp_path, nan_at_step_3)
  assert checkpoints.read_meta(tmp_path)['step'] == 2


def test_refuses_to_resume_another_variant(tmp_path):
  _train(_config(num_train_steps=2), tmp_path)
  other = _config(num_train_steps=2)
  other.model.variant = 'a'
  with pytest.raises(ValueError, match='refusing to resume.*variant c width 4; config asks for '
                                       'variant a width 4'):
    _train(other, tmp_path)


def test_zero_steps_evaluates_the_initial_model(tmp_path):
  config = _config(num_train_steps=0)
  metrics = train.train(config, str(tmp_path), None, _evaluate)
  initial = models.build(config.model, nnx.Rngs(config.seed))
  assert metrics == _evaluate(initial, None, None)
  assert checkpoints.TrainCheckpointer(tmp_path, config).latest_step() is None


def test_configs_are_locked():
  config = _config()
  with pytest.raises(AttributeError, match='Did you mean "width"'):
    config.model.widht = 3


@pytest.mark.slow
def test_cli_rejects_an_unknown_config_key(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'm2mrf_jax.main', '--config=configs/demo.py', f'--workdir={tmp_path}',
       '--config.model.widht=18'], cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert 'unknown config key \'widht\'\nDid you mean "width"' in result.stderr
  assert not list(tmp_path.iterdir())  # nothing written


# ---- TensorBoard events, read back with protobuf and an independent CRC ---------------------


def test_summary_writer_jsonl_and_tensorboard_events(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  with summary.Writer(str(tmp_path)) as writer:
    writer.write_scalars(10, {'loss': 0.5, 'lr': 0.01})
    writer.write_scalars(2**40, {'mAUPR': 0.25})
    writer.write_image(3, 'overlay', image)
  assert [json.loads(l) for l in open(tmp_path / 'log.jsonl')] == [
      {'step': 10, 'loss': 0.5, 'lr': 0.01}, {'step': 2**40, 'mAUPR': 0.25}]
  events = read_events(tmp_path)
  assert events[0].file_version == 'brain.Event:2'
  got = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:4]]
  assert got == [(10, {'loss': 0.5}), (10, {'lr': pytest.approx(0.01)}), (2**40, {'mAUPR': 0.25})]
  (value,) = events[4].summary.value
  assert (events[4].step, value.tag, value.image.height, value.image.width) == (3, 'overlay', 5, 7)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string))),
                                image)
  assert all(e.wall_time > 1e9 for e in events)


@pytest.mark.slow
def test_demo_job_end_to_end(tmp_path):
  """main -> train_and_evaluate with the real data, model and evaluation: the demo, 2 steps, tiny data."""
  result = subprocess.run(
      [sys.executable, '-m', 'm2mrf_jax.main', '--config=configs/demo.py', f'--workdir={tmp_path}',
       '--config.num_train_steps=2', '--config.log_every_steps=1', '--config.batch_size=2',
       '--config.data.synthetic_num_train=2', '--config.data.synthetic_num_test=1',
       '--config.data.synthetic_image_size=(64, 96)', '--config.data.img_scale=(96, 64)',
       '--config.data.crop_size=(64, 64)', f'--jit_cache_dir={tmp_path / "jit"}'],
      cwd=ROOT, env=dict(os.environ, XLA_FLAGS=''), capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert [p.name for p in (tmp_path / 'jit').glob('jit_train_step-*')]  # --jit_cache_dir reached JAX
  records = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2]
  scores = json.loads((tmp_path / 'metrics.json').read_text())
  assert scores['num_images'] == 1 and records[-1]['mAUPR'] == pytest.approx(scores['mAUPR'])
  assert json.loads((tmp_path / 'config.json').read_text())['num_train_steps'] == 2
  assert checkpoints.read_meta(tmp_path)['step'] == 2
  assert [v.tag for e in read_events(tmp_path) for v in e.summary.value if v.HasField('image')] == [
      'pr_curves', 'overlay']


def test_resumes_a_checkpoint_holding_grain_iterator_state(tmp_path):
  # Checkpoints written before the data became a function of the step hold a `data` item.
  config = _config()
  mesh = mesh_lib.make_mesh()
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  nnx.update(model, jax.tree.map(lambda x: x + 1, nnx.state(model, nnx.Param)))
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(iterator)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(2, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
        opt_state=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
        meta=ocp.args.JsonSave({'model': config.model.to_dict(), 'step': 2,
                                'config': config.to_dict()}),
        data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  assert (tmp_path / '2' / 'data').exists()
  step, got = _final_state(tmp_path, config)
  assert step == 2
  want = _leaves(model) + [np.asarray(x) for x in
                           jax.tree.leaves(nnx.to_pure_dict(nnx.state(optimizer)))]
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a, b)
