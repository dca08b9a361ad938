"""Builds a dataset from its download into TFDS array_record files, without TensorFlow.

  python -m data_pipelines.build idrid --manual_dir=/data/IDRiD --data_dir=~/tensorflow_datasets
"""
import os

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from data_pipelines import ddr
from data_pipelines import ddr_grading
from data_pipelines import idrid
from data_pipelines import idrid_grading

BUILDERS = {'idrid': idrid.Builder, 'ddr': ddr.Builder, 'idrid_grading': idrid_grading.Builder,
            'ddr_grading': ddr_grading.Builder}


def builder(name, data_dir):
  """The TFDS builder of dataset `name` ('idrid', 'ddr', ...; 'NAME/CONFIG' picks a builder config)."""
  name, _, config = name.partition('/')
  if name not in BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {tuple(BUILDERS)}')
  kwargs = {'config': config} if config else {}
  return BUILDERS[name](data_dir=os.path.expanduser(os.fspath(data_dir)), file_format='array_record',
                        **kwargs)


def not_built_error(name, data_dir, reason=''):
  """The FileNotFoundError for dataset `name` missing from `data_dir`, saying how to build it."""
  return FileNotFoundError(
      f'{name} is not built in {data_dir}{" " + reason if reason else ""}. Build it once with\n'
      f'  python -m data_pipelines.build {name} --manual_dir=DOWNLOAD --data_dir={data_dir}\n'
      'or set data.manual_dir to the unpacked download (built on first use), or data.synthetic=True '
      'for synthetic data.')


def build(name, manual_dir, data_dir):
  """Reads the download in `manual_dir` and writes dataset `name` into `data_dir`; returns the builder."""
  dataset = builder(name, data_dir)
  tfds.display_progress_bar(True)
  dataset.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(os.fspath(manual_dir))))
  return dataset


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f'Usage: python -m data_pipelines.build {{{",".join(BUILDERS)}}}[/CONFIG] '
                         '--manual_dir=DIR --data_dir=DIR  (ddr_grading/with_ungradable keeps grade 5)')
  if not FLAGS.manual_dir:
    raise app.UsageError('--manual_dir is required: the folder where the download was unpacked.')
  dataset = build(argv[1], FLAGS.manual_dir, FLAGS.data_dir)
  for split, info in dataset.info.splits.items():
    print(f'{argv[1]} {split}: {info.num_examples} examples, {info.num_bytes / 2**20:.1f} MiB')
  print(f'Written to {dataset.data_dir}')


if __name__ == '__main__':
  FLAGS = flags.FLAGS
  flags.DEFINE_string('manual_dir', '', 'The download as it unpacks.')
  flags.DEFINE_string('data_dir', '~/tensorflow_datasets', 'Where the TFDS files are written.')
  app.run(main)
