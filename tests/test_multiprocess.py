"""Real multi-process runs: 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1, gloo) against
1 process x 4 devices, and checkpoints moving between the two; the settings that must fail fast.

The jobs are `python -m tests.multiprocess_job` (main.py with a tiny conv + BN network) on synthetic
IDRiD with the full augmentation; `slow`: four launches, about a minute on 2 idle cores.
"""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from flax import nnx
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from configs import demo
from m2mrf_jax import checkpoints
from m2mrf_jax import distributed
from m2mrf_jax import mesh as mesh_lib
from m2mrf_jax import models
from m2mrf_jax import train
from tests.tiny_model import TinySegmenter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds for one launch (all its processes)
STEPS, SAVED = 4, 2
OVERRIDES = [
    '--config.model.width=4', '--config.batch_size=4', f'--config.num_train_steps={STEPS}',
    '--config.log_every_steps=1', f'--config.checkpoint_every_steps={SAVED}',
    '--config.keep_checkpoints=3', '--config.learning_rate=0.1', '--config.min_learning_rate=0.01',
    '--config.data.synthetic_image_size=(64, 96)', '--config.data.img_scale=(96, 64)',
    '--config.data.crop_size=(48, 64)', '--config.data.ratio_range=(0.5, 2.0)',
    '--config.data.photometric=True', '--config.data.synthetic_num_train=6',  # batches span epochs
    '--config.data.synthetic_num_test=3',  # processes evaluate 2 and 1 images
    '--config.aupr_fine_thresholds=101',
]


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, processes, devices_per_process, *extra):
  """Starts the job in `workdir` as `processes` processes; returns [(Popen, log path)]."""
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}',
         'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
  command = [sys.executable, '-m', 'tests.multiprocess_job', '--config=configs/demo.py',
             f'--workdir={workdir}', '--jit_cache_dir=', *OVERRIDES, *extra]  # no cache in ~/.cache
  if processes > 1:
    command += ['--multihost', f'--coordinator_address=127.0.0.1:{_free_port()}',
                f'--num_processes={processes}', '--initialization_timeout=120']
  launched = []
  for p in range(processes):
    log = f'{workdir}.process{p}.log'
    ids = [f'--process_id={p}'] if processes > 1 else []
    with open(log, 'w') as out:
      launched.append((subprocess.Popen(command + ids, cwd=ROOT, env=env, stdout=out,
                                        stderr=subprocess.STDOUT), log))
  return launched


def _wait(*launches):
  """Waits for every process (killing all after TIMEOUT); fails with their output if one failed."""
  procs = [item for launch in launches for item in launch]
  deadline = time.monotonic() + TIMEOUT
  try:
    for proc, _ in procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  failed = [(proc, log) for proc, log in procs if proc.returncode != 0]
  if failed:
    pytest.fail('\n\n'.join(f'{log} (exit {proc.returncode}):\n{open(log).read()[-6000:]}'
                            for proc, log in failed))


def _resume_copy(source, target):
  """`source` as it was after step SAVED: the later checkpoints and every log removed."""
  shutil.copytree(source, target, ignore=shutil.ignore_patterns('*.log'))
  for name in os.listdir(target):
    if name.isdigit() and int(name) > SAVED or name in ('log.jsonl', 'metrics.json') or \
        name.startswith('events.out'):
      path = os.path.join(target, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return target


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Workdirs: 'one' (1 x 4 devices), 'two' (2 x 2), 'two_then_one', 'one_then_two' (resumed)."""
  root = tmp_path_factory.mktemp('multiprocess')
  dirs = {name: str(root / name) for name in ('one', 'two', 'two_then_one', 'one_then_two')}
  _wait(_start(dirs['one'], 1, 4), _start(dirs['two'], 2, 2))
  _resume_copy(dirs['two'], dirs['two_then_one'])
  _resume_copy(dirs['one'], dirs['one_then_two'])
  _wait(_start(dirs['two_then_one'], 1, 4), _start(dirs['one_then_two'], 2, 2))
  return dirs


def _records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'log.jsonl'))]


def _losses(workdir):
  return {r['step']: r['loss'] for r in _records(workdir) if 'loss' in r}


def _state(workdir, monkeypatch):
  monkeypatch.setattr(models, 'build', TinySegmenter)
  config = demo.get_config()
  config.model.width = 4
  model = checkpoints.restore_model(workdir, config.model)
  return {'/'.join(str(getattr(key, 'key', key)) for key in path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}


def _metrics(workdir):
  return json.load(open(os.path.join(workdir, 'metrics.json')))


def _per_image(workdir):
  with open(os.path.join(workdir, 'per_image.csv'), newline='') as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_processes_equal_one(runs, monkeypatch):
  one, two = _losses(runs['one']), _losses(runs['two'])
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  diffs = [abs(one[s] - two[s]) for s in one]
  print(f'loss |2x2 - 1x4| per step: {diffs}')
  assert max(diffs) < 1e-5
  assert len(set(one.values())) == STEPS  # it trains
  a, b = _state(runs['one'], monkeypatch), _state(runs['two'], monkeypatch)
  assert sorted(a) == sorted(b) and {'bn/mean', 'bn/var', 'conv/kernel'} <= set(a)
  print('max |diff| 2x2 vs 1x4 after the last step:',
        {k: float(np.abs(a[k] - b[k]).max()) for k in sorted(a)})
  assert not np.allclose(a['bn/mean'], 0)  # the statistics moved
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
  ma, mb = _metrics(runs['one']), _metrics(runs['two'])
  print('metric diffs:', {k: abs(ma[k] - mb[k]) for k in ('mAUPR', 'mIoU', 'mF1', 'mAUPR_fine')})
  assert ma['num_images'] == mb['num_images'] == 3
  for key in ('mAUPR', 'mIoU', 'mF1', 'mAUPR_fine'):
    assert abs(ma[key] - mb[key]) < 1e-5, key
  # per_image.csv: the processes' images (2 and 1) gathered back into the split's order.
  one, two = _per_image(runs['one']), _per_image(runs['two'])
  assert [r['id'] for r in one] == [r['id'] for r in two] and len({r['id'] for r in one}) == 3
  for a, b in zip(one, two):
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k.endswith('_true_pixels'))
    for k in a:
      if k.endswith(('_iou', '_aupr_11')) and a[k]:
        assert abs(float(a[k]) - float(b[k])) < 1e-5, k


@pytest.mark.slow
def test_only_process_0_writes_logs_and_metrics(runs):
  files = os.listdir(runs['two'])
  assert len([f for f in files if f.startswith('events.out')]) == 1
  assert 'metrics.json' in files and 'pr_curves.png' in files and 'per_image.csv' in files
  steps = [r['step'] for r in _records(runs['two'])]
  assert steps == list(range(1, STEPS + 1)) + [STEPS]  # one line per step, then the evaluation


@pytest.mark.slow
@pytest.mark.parametrize('resumed,straight', [('two_then_one', 'one'), ('one_then_two', 'one'),
                                              ('two_then_one', 'two')])
def test_checkpoints_move_between_topologies(runs, resumed, straight, monkeypatch):
  got, want = _losses(runs[resumed]), _losses(runs[straight])
  assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
  diffs = [abs(got[s] - want[s]) for s in got]
  print(f'loss |{resumed} - {straight}| steps {sorted(got)}: {diffs}')
  assert max(diffs) < 1e-5
  a, b = _state(runs[resumed], monkeypatch), _state(runs[straight], monkeypatch)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for key in ('mAUPR', 'mIoU', 'mF1'):
    assert abs(_metrics(runs[resumed])[key] - _metrics(runs[straight])[key]) < 1e-5, key


# ---- Settings that must fail fast, naming themselves -----------------------------------------


def test_process_id_out_of_range():
  with pytest.raises(ValueError, match=r'process_id=2 \(--process_id / \$M2MRF_PROCESS_ID\) is out '
                                       r'of range for num_processes=2 .*use 0 \.\. 1'):
    distributed.initialize('127.0.0.1:1234', 2, 2)
  with pytest.raises(ValueError, match=r'num_processes=0 \(--num_processes'):
    distributed.initialize('127.0.0.1:1234', 0, 0)


def test_unreachable_coordinator():
  start = time.monotonic()
  with pytest.raises(TimeoutError, match=r'cannot reach the coordinator at 127\.0\.0\.1:\d+ '
                                         r'\(--coordinator_address / \$JAX_COORDINATOR_ADDRESS\) '
                                         r'within 1 s'):
    distributed.initialize(f'127.0.0.1:{_free_port()}', 2, 1, initialization_timeout=1)
  assert time.monotonic() - start < 10
  with pytest.raises(ValueError, match=r"coordinator host 'no-such-host\.invalid' .* does not "
                                       'resolve'):
    distributed.initialize('no-such-host.invalid:1234', 2, 1)
  with pytest.raises(ValueError, match=r"'127\.0\.0\.1' .* is not HOST:PORT"):
    distributed.initialize('127.0.0.1', 2, 1)


def test_coordinator_address_not_of_this_host():
  # 192.0.2.1 is TEST-NET-1 (RFC 5737): never a local address.
  with pytest.raises(ValueError, match=r'process 0 runs the coordinator, but cannot listen on '
                                       r'192\.0\.2\.1:1234 \(--coordinator_address'):
    distributed.initialize('192.0.2.1:1234', 2, 0)
  with socket.socket() as busy:
    busy.bind(('127.0.0.1', 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(ValueError, match=f'cannot listen on 127.0.0.1:{port}.*in use'):
      distributed.initialize(f'127.0.0.1:{port}', 2, 0)


def test_batch_not_divisible_by_the_devices(tmp_path):
  config = demo.get_config()
  config.batch_size = 6  # 8 devices
  with pytest.raises(ValueError, match=r'config\.batch_size=6 must be a multiple of '
                                       r'config\.grad_accum_steps=1 x 8 devices \(of 1 processes\)'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing prepared, nothing written


def test_command_line_names_the_wrong_setting(tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'M2MRF_PROCESS_ID': '3'}
  result = subprocess.run(
      [sys.executable, '-m', 'm2mrf_jax.main', '--config=configs/demo.py', f'--workdir={tmp_path}',
       '--multihost', '--coordinator_address=127.0.0.1:1234', '--num_processes=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'process_id=3 (--process_id / $M2MRF_PROCESS_ID) is out of range' in result.stderr, \
      result.stderr[-3000:]


def test_process_rows_follow_the_sharding():
  mesh = mesh_lib.make_mesh()  # 8 devices, one process
  assert distributed.process_rows(NamedSharding(mesh, P('data')), 16) == tuple(range(16))
  assert distributed.process_rows(NamedSharding(mesh, P()), 4) == (0, 1, 2, 3)
