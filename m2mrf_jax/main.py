"""Entry point: `python -m m2mrf_jax.main --config=configs/X.py --workdir=DIR [--mode=evaluate]`.

Config fields can be overridden on the command line, e.g. `--config.batch_size=8`.
Multi-host (TPU pods, SLURM, multi-node GPU): pass `--multihost` (or set M2MRF_MULTIHOST=1) on
every process; `jax.distributed.initialize()` then discovers the cluster.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from m2mrf_jax import train
from m2mrf_jax.grading import train as grading_train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and metrics go here.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'],
                  'train (resumes from the workdir, evaluates at the end) or evaluate.')
flags.DEFINE_string('checkpoint', '', 'evaluate: an orbax checkpoint directory (default: the '
                    'latest in --workdir), e.g. one written by m2mrf_jax.convert.')
flags.DEFINE_bool('multihost', os.environ.get('M2MRF_MULTIHOST', '') not in ('', '0'),
                  'Call jax.distributed.initialize() (default from $M2MRF_MULTIHOST).')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's flag parsing, after a readable check of the config overrides."""
  try:
    train.check_overrides(argv[1:], grading_train.reference_config(argv[1:]))
  except ValueError as e:
    sys.exit(f'FATAL Flags parsing error: {e}')
  return app.parse_flags_with_usage(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.info('process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  job = grading_train if FLAGS.config.get('task') == 'grading' else train  # DR grading: SiAN
  if FLAGS.mode == 'train':
    job.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    job.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
