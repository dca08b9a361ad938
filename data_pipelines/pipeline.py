"""grain input pipelines: a TFDS split -> official transforms -> this process's rows of each batch.

Training (mmseg 0.8 train pipeline, in order): the offline x6 dihedral augmentation (done on the fly),
Resize(img_scale, ratio_range, keep_ratio), RandomCrop(crop_size) without cat_max_ratio (with fundus
background it never accepts a crop, so after 10 tries the last random crop is used), PhotoMetricDistortion,
Normalize, Pad(crop_size, 0, seg 0). The host stops before Normalize: batches carry the uint8 pixels (mmseg's
PhotoMetricDistortion rounds back to uint8, so nothing is lost) zero-padded, and each crop's unpadded size;
the jitted step normalises and zeroes the padding (`transforms.normalize_padded`), a quarter of the bytes. Images are decoded and resized exactly as mmcv 1.2 (cv2.imdecode,
cv2.resize INTER_LINEAR of the whole mapped image, then the crop); only the crop window of the labels is
resized (nearest), which equals resizing them whole. The opt-in `reduced_decode` decodes JPEGs at 1/2,
1/4 or 1/8 scale (DCT scaling) when the rescaled image is that small and resizes only the crop window
with Pillow's antialiased bilinear: faster, but not the official input (README).
"""
import collections.abc
import dataclasses
import sys

from absl import flags
import grain
import jax
import numpy as np

from data_pipelines import codecs
from data_pipelines import sources
from data_pipelines import transforms


def _image_window(data, size, k, target, window, reduced_decode):
  """uint8 RGB pixels of `window` of the JPEG `data` (of `size`) after dihedral map k and the resize.

  Args:
    data: JPEG bytes.
    size: (H, W) of the JPEG.
    k: the dihedral map.
    target: (h, w) of the mapped image after the keep-ratio resize.
    window: (y0, x0, h, w) of the resized image to return.
    reduced_decode: the opt-in fast path (module docstring); False: exactly as mmcv.

  Returns:
    uint8 (h, w, 3) RGB.
  """
  y0, x0, h, w = window
  if not reduced_decode:  # mmcv: imfrombytes, (offline) dihedral map, imrescale, crop; BGR until cropped
    image = transforms.dihedral_copy(codecs.decode_jpeg(data, 'bgr'), k)
    crop = transforms.resize_linear(image, target)[y0:y0 + h, x0:x0 + w]
    return np.ascontiguousarray(crop[..., ::-1])
  # The window is resized before the dihedral map, in the decoded image's own orientation (bilinear
  # resizing commutes with the map, and the map is cheaper on the crop).
  unmapped = transforms.dihedral_size(target, k)
  image, factor = codecs.open_jpeg(data, min_size=unmapped)
  wy, wx, wh, ww = transforms.dihedral_window(window, unmapped, k)
  sy, sx = size[0] / unmapped[0] / factor, size[1] / unmapped[1] / factor
  return transforms.dihedral(transforms.resize_antialiased(
      image, (wh, ww), (wx * sx, wy * sy, (wx + ww) * sx, (wy + wh) * sy)), k)


def train_example(record, rng, *, img_scale, ratio_range, crop_size, dihedral=True, photometric=True,
                  label_mode='exclusive', reduced_decode=False):
  """One training example from a raw record.

  Args:
    record: a raw record (`sources.raw_source`): JPEG bytes, mask bits bytes, height, width.
    rng: `np.random.Generator`; draws in order: dihedral map, ratio, crop offsets, photometric.
    img_scale: the keep-ratio box (long, short).
    ratio_range: (low, high) of the random ratio of `img_scale`.
    crop_size: (h, w) of the crop and of the output.
    dihedral: whether to apply a random one of the six dihedral maps first.
    photometric: whether to apply the photometric distortion.
    label_mode: 'exclusive' or 'multilabel' (`transforms.labels_from_bits`).
    reduced_decode: the opt-in reduced-size JPEG decode and antialiased resize (`data.reduced_decode`).

  Returns:
    {'image': uint8 (h, w, 3) RGB before normalisation, 0 in the padding; 'image_size': int32 (2,), the
    (h', w') of the crop before the pad; 'label': uint8 (h, w, 4), 0 in the padding}.
  """
  size = (int(record['height']), int(record['width']))
  k = int(rng.integers(len(transforms.DIHEDRAL_NAMES))) if dihedral else 0
  ratio = rng.uniform(*ratio_range)
  oriented = transforms.dihedral_size(size, k)
  target = transforms.rescale_size(oriented, img_scale, ratio)
  y0, x0, ch, cw = transforms.random_crop_box(target, crop_size, rng)
  pixels = _image_window(record['image'], size, k, target, (y0, x0, ch, cw), reduced_decode)

  bits = transforms.dihedral(codecs.decode_bits(record['mask_bits'], size), k)
  bits = transforms.resize_nearest(bits, target, (y0, x0, ch, cw))
  label = transforms.labels_from_bits(bits, label_mode)

  if photometric:
    pixels = transforms.photometric_distortion(pixels, rng)
  return {'image': transforms.pad_to(pixels, crop_size),
          'image_size': np.array(pixels.shape[:2], np.int32),
          'label': transforms.pad_to(label, crop_size)}


def eval_example(record, *, img_scale, mean, std, label_mode='exclusive', reduced_decode=False):
  """One evaluation example: the image at the test scale, the masks at the original size.

  Args:
    record: a raw record (`sources.raw_source`).
    img_scale: the keep-ratio box (long, short): IDRiD 4288x2848 -> 1440x956.
    mean: RGB mean.
    std: RGB std.
    label_mode: 'exclusive' or 'multilabel'.
    reduced_decode: the opt-in reduced-size JPEG decode and antialiased resize (`data.reduced_decode`).

  Returns:
    {'id': str, 'image': float32 (h', w', 3) normalised, 'masks': bool (H, W, 4),
     'original_size': (H, W)}.
  """
  size = (int(record['height']), int(record['width']))
  target = transforms.rescale_size(size, img_scale)
  pixels = _image_window(record['image'], size, 0, target, (0, 0) + target, reduced_decode)
  bits = codecs.decode_bits(record['mask_bits'], size)
  return {'id': record['id'].decode(),
          'image': transforms.normalize(pixels, mean, std),
          'masks': transforms.labels_from_bits(bits, label_mode).astype(bool),
          'original_size': size}


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """`train_example` as a grain RandomMap (module level, so that spawned workers can unpickle it)."""
  img_scale: tuple[int, int]
  ratio_range: tuple[float, float]
  crop_size: tuple[int, int]
  dihedral: bool
  photometric: bool
  label_mode: str
  reduced_decode: bool = False

  def random_map(self, element, rng):
    return train_example(element, rng, **dataclasses.asdict(self))


def train_transform(data_config):
  """The `TrainTransform` of a `data` config section."""
  transforms.check_label_mode(data_config.label_mode)  # here, not first in a worker
  return TrainTransform(
      img_scale=tuple(data_config.img_scale), ratio_range=tuple(data_config.ratio_range),
      crop_size=tuple(data_config.crop_size), dihedral=bool(data_config.dihedral),
      photometric=bool(data_config.photometric), label_mode=data_config.label_mode,
      reduced_decode=bool(data_config.reduced_decode))


class ProcessRows(collections.abc.Sequence):
  """This process's rows of every global batch from `start_step` on, as one sequence of examples.

  Element i is row rows[i % len(rows)] of global batch start_step + i // len(rows), i.e. example
  (start_step + i // len(rows)) * batch_size + rows[i % len(rows)] of the infinite `stream`.
  """

  def __init__(self, stream, batch_size, rows, start_step):
    self._stream, self._batch_size = stream, batch_size
    self._rows, self._start_step = tuple(rows), start_step

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, index):
    step, row = divmod(index, len(self._rows))
    return self._stream[(self._start_step + step) * self._batch_size + self._rows[row]]


def train_stream(data_config, data_dir, *, seed):
  """The infinite `grain.MapDataset` of training examples in their global order.

  Example g is a pure function of (seed, g): epoch g // N (N examples) is the permutation of the split
  drawn from seed + epoch (grain's index shuffle), and its augmentation draws from an rng seeded by
  (seed, g) (grain's random_map). Global batch k is examples k B .. k B + B - 1.
  """
  source = sources.raw_source(data_config.name, data_config.train_split, data_dir)
  return (grain.MapDataset.source(source).seed(seed)
          .shuffle()  # a new permutation each epoch
          .repeat()
          .random_map(train_transform(data_config)))


def default_rows(batch_size, process_index, process_count):
  """The rows of a global batch that process p holds under a 1-D mesh of equal processes: one block."""
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the {process_count} processes')
  local = batch_size // process_count
  return range(process_index * local, (process_index + 1) * local)


def train_dataset(data_config, data_dir, *, batch_size, seed, start_step=0, rows=None):
  """This process's `grain.IterDataset` of training batches (see `train_iterator`)."""
  rows = default_rows(batch_size, jax.process_index(), jax.process_count()) if rows is None else rows
  if not rows or min(rows) < 0 or max(rows) >= batch_size:
    raise ValueError(f'rows {rows} are not rows of a global batch of {batch_size}')
  stream = train_stream(data_config, data_dir, seed=seed)
  dataset = (grain.MapDataset.source(ProcessRows(stream, batch_size, rows, start_step))
             .batch(len(rows), drop_remainder=True))
  workers = int(data_config.num_workers)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=1 if workers else 2, prefetch_buffer_size=int(data_config.prefetch)))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; a main without absl.app has none parsed
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(data_config.prefetch)))
  return dataset


def train_iterator(data_config, data_dir, *, batch_size, seed, start_step=0, rows=None):
  """Infinite, shuffled, augmented training batches: this process's rows of global batches k >= start_step.

  Global batch k is a pure function of (seed, k), whatever the number of processes and devices
  (`train_stream`); each process decodes only its rows of it. Resuming at step k needs nothing but k.

  Args:
    data_config: the `data` section of the config.
    data_dir: the TFDS data_dir (`prepare.prepare`).
    batch_size: the global batch B.
    seed: the data seed.
    start_step: the first global batch to yield.
    rows: the sorted rows of each global batch this process feeds to its devices (e.g.
      `m2mrf_jax.distributed.process_rows`); None: block p of B / P rows for process p of P.

  Returns:
    an iterator of {'image': uint8 (len(rows), crop_h, crop_w, 3), 'image_size': int32 (len(rows), 2),
    'label': uint8 (len(rows), crop_h, crop_w, 4)} (`train_example`).
  """
  return iter(train_dataset(data_config, data_dir, batch_size=batch_size, seed=seed,
                            start_step=start_step, rows=rows))


def eval_dataset(data_config, data_dir, split, *, process_index=None, process_count=None):
  """The `eval_example`s of `split` for process `process_index` of `process_count` (default: this one).

  Process p gets examples p, p + count, p + 2 count, ...: the shares are disjoint and cover the split.

  Returns:
    a `grain.MapDataset` of `eval_example` dicts in the split's order (`len`, indexing; read it with
    `.to_iter_dataset(grain.ReadOptions(...))` to decode ahead in threads).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  source = sources.raw_source(data_config.name, split, data_dir)
  if not len(source):
    raise ValueError(f'split {split!r} of {data_config.name} in {data_dir} has no examples')
  transforms.check_label_mode(data_config.label_mode)
  return (grain.MapDataset.source(source)[process_index::process_count]
          .map(lambda record: eval_example(
              record, img_scale=tuple(data_config.img_scale), mean=data_config.mean,
              std=data_config.std, label_mode=data_config.label_mode,
              reduced_decode=bool(data_config.reduced_decode))))
