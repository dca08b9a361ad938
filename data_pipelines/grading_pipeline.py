"""grain input pipelines for DR grading: a photograph fitted into a square, and its grade.

Every photograph is resized (bilinear, keeping its aspect ratio) so that its long side is
`data.image_size`, and padded with black to a centred square: the fundus background is black, so the
padding looks like more background. Training adds, as the paper's "random rotation, flip and changes
in brightness, saturation and contrast": one of the six dihedral maps (rotations by 90 degrees and
flips) and mmseg's PhotoMetricDistortion.
"""
import dataclasses

from absl import flags
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np

from data_pipelines import build as build_lib
from data_pipelines import codecs
from data_pipelines import pipeline
from data_pipelines import sources
from data_pipelines import synthetic_grading
from data_pipelines import transforms

DATASETS = tuple(synthetic_grading.SPLITS)  # 'ddr_grading', 'idrid_grading'


def builder_name(data_config):
  """'ddr_grading/with_ungradable' when DDR's grade 5 is kept, else the dataset name."""
  if data_config.name not in DATASETS:
    raise ValueError(f'data.name must be one of {DATASETS} for grading, got {data_config.name!r}')
  if data_config.keep_ungradable and data_config.name != 'ddr_grading':
    raise ValueError('data.keep_ungradable applies to ddr_grading only (IDRiD has no grade 5)')
  return f'{data_config.name}/with_ungradable' if data_config.keep_ungradable else data_config.name


def prepare(data_config, workdir):
  """Builds the grading dataset if needed (synthetic into workdir, or from data.manual_dir).

  Returns:
    the TFDS data_dir holding it.
  """
  name = builder_name(data_config)
  data_dir = (epath.Path(workdir) / 'tfds' if data_config.synthetic
              else epath.Path(data_config.data_dir).expanduser())
  built = build_lib.builder(name, data_dir).is_prepared()
  if not built and not data_config.synthetic and not data_config.manual_dir:
    raise FileNotFoundError(
        f'{name} is not built in {data_dir}. Set data.manual_dir to the unpacked download, or build it '
        f'once with\n  python -m data_pipelines.build {name} --manual_dir=DOWNLOAD '
        f'--data_dir={data_dir}\nor set data.synthetic=True for synthetic data.')
  if not built and jax.process_index() == 0:
    manual_dir = data_config.manual_dir
    if data_config.synthetic:
      manual_dir = epath.Path(workdir) / 'synthetic' / data_config.name
      if manual_dir.exists():  # left by an interrupted run, maybe with other settings
        manual_dir.rmtree()
      counts = {s: data_config.synthetic_num_train if s == 'train' else data_config.synthetic_num_test
                for s in synthetic_grading.SPLITS[data_config.name]}
      synthetic_grading.write_download(data_config.name, manual_dir, num_images=counts,
                                       image_size=tuple(data_config.synthetic_image_size),
                                       seed=data_config.synthetic_seed)
    build_lib.build(name, manual_dir, data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'grading_pipeline.prepare {name}')
  return str(data_dir)


def square_box(size, image_size):
  """(top, left, h, w) of an (H, W) photograph resized into the centred `image_size` square."""
  h, w = transforms.rescale_size(size, (image_size, image_size))
  return (image_size - h) // 2, (image_size - w) // 2, h, w


def pad_square(pixels, image_size):
  """Centres uint8 (h, w, 3) pixels (h, w <= image_size) on a black (image_size, image_size) square."""
  out = np.zeros((image_size, image_size, 3), np.uint8)
  top, left = (image_size - pixels.shape[0]) // 2, (image_size - pixels.shape[1]) // 2
  out[top:top + pixels.shape[0], left:left + pixels.shape[1]] = pixels
  return out


def fit_square(record, image_size):
  """A raw record's photograph, keep-ratio resized to long side `image_size` and centred on black.

  Returns:
    uint8 (image_size, image_size, 3).
  """
  size = (int(record['height']), int(record['width']))
  target = square_box(size, image_size)[2:]
  image, factor = codecs.open_jpeg(record['image'], min_size=target)
  pixels = transforms.resize_antialiased(image, target, (0, 0, size[1] / factor, size[0] / factor))
  return pad_square(pixels, image_size)


def train_example(record, rng, *, image_size, dihedral=True, photometric=True):
  """{'image': uint8 (S, S, 3), 'grade': int32}; rng draws the dihedral map, then the photometrics."""
  image = fit_square(record, image_size)
  if dihedral:
    image = np.ascontiguousarray(transforms.dihedral(
        image, int(rng.integers(len(transforms.DIHEDRAL_NAMES)))))
  if photometric:
    image = transforms.photometric_distortion(image, rng)
  return {'image': image, 'grade': np.int32(record['grade'])}


def eval_example(record, *, image_size):
  """{'id': str, 'image': uint8 (S, S, 3), 'grade': int}."""
  return {'id': record['id'].decode(), 'image': fit_square(record, image_size),
          'grade': int(record['grade'])}


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """`train_example` as a grain RandomMap (module level, so that spawned workers can unpickle it)."""
  image_size: int
  dihedral: bool
  photometric: bool

  def random_map(self, element, rng):
    return train_example(element, rng, **dataclasses.asdict(self))


def train_stream(data_config, data_dir, *, seed):
  """The infinite `grain.MapDataset` of training examples in their global order.

  Example g is a pure function of (seed, g), as `pipeline.train_stream`: epoch g // N is a
  permutation drawn from seed + epoch, and its augmentation draws from an rng seeded by (seed, g).
  """
  source = sources.raw_source(builder_name(data_config), data_config.train_split, data_dir)
  transform = TrainTransform(int(data_config.image_size), bool(data_config.dihedral),
                             bool(data_config.photometric))
  return grain.MapDataset.source(source).seed(seed).shuffle().repeat().random_map(transform)


def train_iterator(data_config, data_dir, *, batch_size, seed, start_step=0, rows=None):
  """Infinite, shuffled, augmented training batches: this process's rows of global batches k >= start_step.

  Global batch k is a pure function of (seed, k), whatever the number of processes and devices, so
  resuming at step k needs nothing but k (`pipeline.train_iterator`, whose rows and workers it shares).

  Returns:
    an iterator of {'image': uint8 (len(rows), S, S, 3), 'grade': int32 (len(rows),)}.
  """
  rows = pipeline.default_rows(batch_size, jax.process_index(), jax.process_count()) if rows is None else rows
  if not rows or min(rows) < 0 or max(rows) >= batch_size:
    raise ValueError(f'rows {rows} are not rows of a global batch of {batch_size}')
  stream = train_stream(data_config, data_dir, seed=seed)
  dataset = (grain.MapDataset.source(pipeline.ProcessRows(stream, batch_size, rows, start_step))
             .batch(len(rows), drop_remainder=True))
  workers = int(data_config.num_workers)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=1 if workers else 2, prefetch_buffer_size=int(data_config.prefetch)))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(data_config.prefetch)))
  return iter(dataset)


def eval_dataset(data_config, data_dir, split):
  """This process's share of `split` (examples p, p + count, ...) as a `grain.MapDataset` of
  `eval_example` dicts in the split's order."""
  source = sources.raw_source(builder_name(data_config), split, data_dir)
  if not len(source):
    raise ValueError(f'no images in split {split!r} of {data_config.name} in {data_dir}')
  image_size = int(data_config.image_size)
  return (grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
          .map(lambda record: eval_example(record, image_size=image_size)))
