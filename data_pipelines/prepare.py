"""`prepare(data_config, workdir)`: the dataset of a config, built on first use; returns its data_dir."""
import os

from etils import epath
import jax
from jax.experimental import multihost_utils

from data_pipelines import build
from data_pipelines import synthetic


def prepare(data_config, workdir):
  """Makes sure the dataset of `data_config` is built and returns its TFDS data_dir.

  * data_config.synthetic: writes a synthetic download under workdir/synthetic/NAME and builds it into
    workdir/tfds (both skipped when already built);
  * elif data_config.manual_dir: builds the download into data_config.data_dir unless built already;
  * else: checks that data_config.data_dir holds the built dataset.
  Only process 0 writes; the others wait at a barrier.

  Args:
    data_config: the `data` section of the config (configs/common.py).
    workdir: the job's working directory.

  Returns:
    the data_dir to pass to `sources` and `pipeline`.
  """
  name = data_config.name
  if data_config.synthetic:
    data_dir = epath.Path(workdir) / 'tfds'
  else:
    data_dir = epath.Path(os.path.expanduser(data_config.data_dir))
  built = build.builder(name, data_dir).is_prepared()
  if not built and not data_config.synthetic and not data_config.manual_dir:
    raise build.not_built_error(name, data_dir)
  if not built and jax.process_index() == 0:
    if data_config.synthetic:
      counts = {s: data_config.synthetic_num_train if s == 'train' else data_config.synthetic_num_test
                for s in synthetic.SPLITS[name]}
      manual_dir = epath.Path(workdir) / 'synthetic' / name
      if manual_dir.exists():  # left by an interrupted run, maybe with other settings
        manual_dir.rmtree()
      manual_dir = synthetic.write_download(
          name, manual_dir, num_images=counts,
          image_size=tuple(data_config.synthetic_image_size), seed=data_config.synthetic_seed)
    else:
      manual_dir = data_config.manual_dir
    build.build(name, manual_dir, data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'data_pipelines.prepare {name}')
  if not build.builder(name, data_dir).is_prepared():
    raise build.not_built_error(name, data_dir, '(process 0 did not build it)')
  return str(data_dir)
