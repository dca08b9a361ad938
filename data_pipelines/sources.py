"""Random access to a built split: raw records for the pipelines, decoded examples for everyone else."""
import grain
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import build
from data_pipelines import codecs
from data_pipelines import transforms


def raw_source(name, split, data_dir):
  """The split's records with `image` (JPEG bytes) and `mask_bits` (zlib bytes) left encoded.

  Args:
    name: 'idrid' or 'ddr'.
    split: idrid 'train' | 'test'; ddr 'train' | 'validation' | 'test'.
    data_dir: the TFDS data_dir the dataset was built into.

  Returns:
    a picklable random-access sequence of dicts (`records.features`).
  """
  builder = build.builder(name, data_dir)
  if not builder.is_prepared():
    raise build.not_built_error(name, data_dir)
  if split not in builder.info.splits:
    raise ValueError(f'{name} has splits {tuple(builder.info.splits)}, not {split!r}')
  return builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})


def decode(record):
  """A raw record -> {id, image (H, W, 3) uint8, masks (H, W, 4) bool, has_mask (4,) bool[, optic_disc]}."""
  bits = codecs.decode_bits(record['mask_bits'], (record['height'], record['width']))
  example = {
      'id': record['id'].decode(),
      'image': codecs.decode_jpeg(record['image']),
      'masks': transforms.labels_from_bits(bits, 'multilabel').astype(bool),
      'has_mask': np.asarray(record['has_mask'], bool),
  }
  if 'has_optic_disc' in record:
    example['optic_disc'] = (bits >> codecs.OPTIC_DISC_BIT & 1).astype(bool)
  return example


def load(name, split, data_dir):
  """The decoded examples (`decode`) of a built split, read on access: a `grain.MapDataset`.

  `len(examples)`, `examples[i]` (as grain, an index wraps around modulo the length) and iteration.
  """
  return grain.MapDataset.source(raw_source(name, split, data_dir)).map(decode)
