"""Entry point: `python -m m2mrf_jax.main --config=configs/X.py --workdir=DIR [--mode=evaluate]`.

Config fields can be overridden on the command line, e.g. `--config.batch_size=8`; the config is
locked, so an unknown key fails (ml_collections says "Did you mean ...").
The console shows one line per log window, checkpoint and evaluation; the libraries' INFO lines (orbax,
jax, grain, TFDS) come back with --verbosity=1, their DEBUG lines with --verbosity=2 (`console`).
Multi-host: pass `--multihost` (or set M2MRF_MULTIHOST=1) on every process. On TPU pods, SLURM and
Open MPI `jax.distributed.initialize()` discovers the job; elsewhere give --coordinator_address (process
0's HOST:PORT), --num_processes and --process_id, or their variables (README, "Several hosts").
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from m2mrf_jax import console
from m2mrf_jax import distributed
from m2mrf_jax import evaluate
from m2mrf_jax import inference
from m2mrf_jax import train
from m2mrf_jax import xla_options
from m2mrf_jax.grading import train as grading_train

FLAGS = flags.FLAGS


def _env_int(name):
  value = os.environ.get(name)
  try:
    return None if value in (None, '') else int(value)
  except ValueError:
    sys.exit(f'FATAL ${name}={value!r} is not an integer')


config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and metrics go here.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'],
                  'train (resumes from the workdir, evaluates at the end) or evaluate.')
flags.DEFINE_string('checkpoint', '', 'evaluate: an orbax checkpoint directory (default: the '
                    'latest in --workdir), e.g. one written by m2mrf_jax.convert.')
flags.DEFINE_enum('tta', None, list(inference.TTA_MODES), 'Test-time augmentation of the evaluation: '
                  'none (official) or flip (left-right mirror, logits averaged); default: the config\'s '
                  '`tta`.')
flags.DEFINE_bool('multihost', os.environ.get('M2MRF_MULTIHOST', '') not in ('', '0'),
                  'Call jax.distributed.initialize() (default from $M2MRF_MULTIHOST).')
flags.DEFINE_string('coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
                    '--multihost: HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS; '
                    'discovered on TPU pods, SLURM, Open MPI).')
flags.DEFINE_integer('num_processes', _env_int('M2MRF_NUM_PROCESSES'),
                     '--multihost: number of processes (default $M2MRF_NUM_PROCESSES; discovered '
                     'on TPU pods, SLURM, Open MPI).')
flags.DEFINE_integer('process_id', _env_int('M2MRF_PROCESS_ID'),
                     '--multihost: this process, 0 .. num_processes - 1 (default $M2MRF_PROCESS_ID; '
                     'discovered on TPU pods, SLURM, Open MPI).')
flags.DEFINE_string('jit_cache_dir', xla_options.CACHE_DIR, xla_options.CACHE_HELP)
flags.DEFINE_integer('initialization_timeout', 300,
                     '--multihost: seconds to wait for the coordinator and every process.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's parsing; an unknown `--config.KEY` exits with ml_collections' message, not a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # ml_collections' KeyError, wrapped in AttributeError(s)
    while isinstance(e, BaseException) and e.args:
      e = e.args[0]
    sys.exit(f'FATAL Flags parsing error: unknown config key {e}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.setup(FLAGS.verbosity)
  xla_options.use_compilation_cache(FLAGS.jit_cache_dir)
  if FLAGS.multihost:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.initialization_timeout)
  logging.info('process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  grading = FLAGS.config.get('task') == 'grading'  # DR grading (SiAN), configs/*_grading.py
  if FLAGS.tta is not None:
    if grading:
      raise app.UsageError('--tta is for the lesion segmentation configs, not DR grading')
    FLAGS.config.tta = FLAGS.tta
  if FLAGS.mode == 'train':
    (grading_train if grading else train).train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    (grading_train if grading else evaluate).evaluate_checkpoint(FLAGS.config, FLAGS.workdir,
                                                                FLAGS.checkpoint)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
