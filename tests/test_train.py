"""The training job on 8 fake CPU devices: sharding, global BN, accumulation, resume, guards, logs.

A tiny conv + BN segmenter stands in for HRNet (what is tested is the loop, not the network);
the data is an in-memory grain dataset whose batch k, as the real one's, depends only on (seed, k).
"""
import json
import os
import signal
import struct

from flax import nnx
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from m2mrf_jax import checkpoints
from m2mrf_jax import losses
from m2mrf_jax import models
from m2mrf_jax import summary
from m2mrf_jax import train
from tests.tiny_model import TinySegmenter

SIZE = 8  # image side


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
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
  label = (rng.random((n, SIZE, SIZE, 4)) < 0.3).astype(np.uint8)
  return {'image': image, 'label': label}


def _one_device_mesh():
  return jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])


def _run_steps(config, mesh, batches):
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = train.make_train_step(graphdef, losses.dice_loss, losses.poly_schedule(config),
                               config.grad_accum_steps, mesh)
  out = []
  for batch in batches:
    state, metrics = step(state, train.global_batch(mesh, batch))
    out.append(float(metrics['loss']))
  nnx.update((model, optimizer), state)
  return model, out


def _leaves(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))]


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() == 8
  config, batches = _config(), [_batch(0), _batch(1)]
  sharded, sharded_losses = _run_steps(config, train.make_mesh(), batches)
  single, single_losses = _run_steps(config, _one_device_mesh(), batches)
  assert sharded.conv.kernel[...].sharding.is_fully_replicated
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-6)
  for a, b in zip(_leaves(sharded), _leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(_leaves(sharded)[0], _leaves(models.build(config.model, nnx.Rngs(0)))[0])


def test_batchnorm_statistics_are_over_the_global_batch():
  config, batch = _config(), _batch(2)
  model, _ = _run_steps(config, train.make_mesh(), [batch])
  initial = models.build(config.model, nnx.Rngs(config.seed))
  features = np.asarray(initial.conv(batch['image']), np.float64)  # (8, H, W, width)
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
                                       train.make_mesh(), [doubled])
  plain, plain_losses = _run_steps(_config(), train.make_mesh(), [half])
  np.testing.assert_allclose(acc_losses, plain_losses, rtol=1e-6)
  for name in ('conv', 'head'):
    np.testing.assert_allclose(getattr(accumulated, name).kernel[...],
                               getattr(plain, name).kernel[...], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(accumulated.bn.mean[...], 1.9 * plain.bn.mean[...], rtol=1e-5)


# ---- The whole job: train_and_evaluate with in-memory data ----------------------------------


def _train_iterator(data_config, data_dir, *, batch_size, seed, start_step, rows):
  del data_config, data_dir
  assert rows == tuple(range(batch_size))  # one process: every row
  examples = [{k: v[0] for k, v in _batch(i, 1).items()} for i in range(20)]
  dataset = grain.MapDataset.source(examples).seed(seed).shuffle().repeat().batch(batch_size)
  return iter(dataset[start_step:].to_iter_dataset())


def _evaluate_model(model, config, data_dir, mesh):
  del config, data_dir, mesh
  score = float(jnp.mean(jax.nn.sigmoid(model.head.bias[...])))
  return {'mAUPR': score, 'mIoU': score / 2, 'mF1': score / 3}


@pytest.fixture
def job(monkeypatch, tmp_path):
  """Replaces data and evaluation by in-memory stand-ins.

  Yields `install(hook)`: from then on the n-th global batch goes through hook(n, local_batch);
  `install(None)` removes it.
  """
  hooks, calls = [], []
  monkeypatch.setattr(train.data_pipelines, 'prepare', lambda data, workdir: str(tmp_path / 'data'),
                      raising=False)
  monkeypatch.setattr(train.pipeline, 'train_iterator', _train_iterator, raising=False)
  monkeypatch.setattr(train.evaluate, 'evaluate_model', _evaluate_model, raising=False)
  monkeypatch.setattr(train.evaluate, 'report', lambda metrics, workdir: None, raising=False)
  real_global_batch = train.global_batch

  def global_batch(mesh, local):
    calls.append(1)
    for hook in hooks:
      local = hook(len(calls), local)
    return real_global_batch(mesh, local)

  def install(hook):
    hooks.clear()
    calls.clear()
    if hook is not None:
      hooks.append(hook)

  monkeypatch.setattr(train, 'global_batch', global_batch)
  yield install


def _final_state(workdir, config):
  model, optimizer = train.create_model_and_optimizer(config, train.make_mesh())
  ckpt = checkpoints.TrainCheckpointer(workdir, config, handle_sigterm=False)
  step = ckpt.restore(model, optimizer)
  ckpt.close()
  return step, _leaves(model) + [np.asarray(x) for x in jax.tree.leaves(
      nnx.to_pure_dict(nnx.state(optimizer)))]


def test_kill_and_resume_is_bit_exact(job, tmp_path):
  config = _config()
  reference = train.train_and_evaluate(config, str(tmp_path / 'uninterrupted'))

  def kill_at_step_5(call, local):
    if call == 5:
      raise KeyboardInterrupt('killed')
    return local
  job(kill_at_step_5)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'killed'))
  job(None)
  assert checkpoints.read_meta(tmp_path / 'killed')['step'] == 4
  resumed = train.train_and_evaluate(config, str(tmp_path / 'killed'))

  def sigterm_at_step_3(call, local):
    if call == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return local
  job(sigterm_at_step_3)
  assert train.train_and_evaluate(config, str(tmp_path / 'preempted')) is None
  job(None)
  assert checkpoints.read_meta(tmp_path / 'preempted')['step'] == 3
  train.train_and_evaluate(config, str(tmp_path / 'preempted'))

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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(job, tmp_path):
  def nan_at_step_3(call, local):
    return {**local, 'image': local['image'] * np.nan} if call == 3 else local
  job(nan_at_step_3)
  with pytest.raises(FloatingPointError, match='loss is nan at step 3.*step 2'):
    train.train_and_evaluate(_config(), str(tmp_path))
  assert checkpoints.read_meta(tmp_path)['step'] == 2


def test_refuses_to_resume_another_variant(job, tmp_path):
  train.train_and_evaluate(_config(num_train_steps=2), str(tmp_path))
  other = _config(num_train_steps=2)
  other.model.variant = 'a'
  with pytest.raises(ValueError, match='refusing to resume.*variant c width 4; config asks for '
                                       'variant a width 4'):
    train.train_and_evaluate(other, str(tmp_path))


def test_zero_steps_evaluates_the_initial_model(job, tmp_path):
  config = _config(num_train_steps=0)
  metrics = train.train_and_evaluate(config, str(tmp_path))
  initial = models.build(config.model, nnx.Rngs(config.seed))
  assert metrics == _evaluate_model(initial, None, None, None)
  assert checkpoints.TrainCheckpointer(tmp_path, config).latest_step() is None


def test_unknown_config_key_lists_valid_keys():
  config = _config()
  config.model.unlock()
  config.model.depth = 3
  with pytest.raises(ValueError, match=r'unknown config key config\.model\.depth; valid keys of '
                                       r'config\.model: dtype, encode_rate, fc_rate'):
    train.validate_config(config)
  with pytest.raises(ValueError, match=r'config\.bogus .*valid keys of config: aupr_fine'):
    train.check_overrides(['--config.batch_size=2', '--config.bogus=1'])
  train.check_overrides(['--config.data.crop_size=(8, 8)', '--workdir=/tmp'])


# ---- TensorBoard events, read back with protobuf and an independent CRC ---------------------


def _crc32c_bitwise(data):
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def _event_class():
  """tensorflow/core/util/event.proto (the fields written here), built at run time."""
  # pylint: disable-next=g-import-not-at-top
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  f = descriptor_pb2.FileDescriptorProto(name='event_test.proto', package='t')
  value = f.message_type.add(name='Value')
  value.field.add(name='tag', number=1, type=9, label=1)
  value.field.add(name='simple_value', number=2, type=2, label=1)
  summ = f.message_type.add(name='Summary')
  summ.field.add(name='value', number=1, type=11, label=3, type_name='.t.Value')
  event = f.message_type.add(name='Event')
  event.field.add(name='wall_time', number=1, type=1, label=1)
  event.field.add(name='step', number=2, type=3, label=1)
  event.field.add(name='file_version', number=3, type=9, label=1)
  event.field.add(name='summary', number=5, type=11, label=1, type_name='.t.Summary')
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('t.Event'))


def test_crc32c_known_value():
  assert summary.crc32c(b'123456789') == 0xE3069283


def test_summary_writer_jsonl_and_tensorboard_events(tmp_path):
  writer = summary.SummaryWriter(str(tmp_path))
  writer.scalars(10, {'loss': 0.5, 'lr': 0.01})
  writer.scalars(2**40, {'mAUPR': 0.25})
  writer.close()
  assert [json.loads(l) for l in open(tmp_path / 'log.jsonl')] == [
      {'step': 10, 'loss': 0.5, 'lr': 0.01}, {'step': 2**40, 'mAUPR': 0.25}]

  data = open(writer.events_path, 'rb').read()
  mask = lambda c: (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  events, pos, event_class = [], 0, _event_class()
  while pos < len(data):
    (length,) = struct.unpack_from('<Q', data, pos)
    (length_crc,) = struct.unpack_from('<I', data, pos + 8)
    assert length_crc == mask(_crc32c_bitwise(data[pos:pos + 8]))
    payload = data[pos + 12:pos + 12 + length]
    assert struct.unpack_from('<I', data, pos + 12 + length)[0] == mask(_crc32c_bitwise(payload))
    events.append(event_class.FromString(payload))
    pos += 16 + length
  assert events[0].file_version == 'brain.Event:2'
  got = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
  assert got == [(10, {'loss': 0.5, 'lr': pytest.approx(0.01)}), (2**40, {'mAUPR': 0.25})]
  assert all(e.wall_time > 1e9 for e in events)


def test_resumes_a_checkpoint_holding_grain_iterator_state(tmp_path):
  # Checkpoints written before the data became a function of the step hold a `data` item.
  config = _config()
  mesh = train.make_mesh()
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
