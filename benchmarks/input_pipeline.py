"""Training input pipeline throughput on IDRiD-sized (4288x2848) synthetic data.

  python -m benchmarks.input_pipeline [--workers=0,1,2] [--modes=exact,reduced] [--num_images=8]

Prints the size of an example on disk, the CPU time of one training and one evaluation example in
process (and of each stage), and training examples/s for each number of workers, for the official
decode and resize (`exact`) and the opt-in `data.reduced_decode`. Then what the opt-in does to the
inputs: on a 4288x2848 JPEG with 400 microaneurysm-like dots, the grey-level difference from OpenCV's
imdecode + cv2.resize (the official input) and the dots' contrast relative to it. On a shared machine
the wall-clock rates understate an idle one; CPU times are less affected (2 cores / CPU time per
example bounds the 2-worker rate).
"""
import tempfile
import time

from absl import app
from absl import flags
import cv2
from etils import epath
import numpy as np

from configs import common
from data_pipelines import build
from data_pipelines import codecs
from data_pipelines import pipeline
from data_pipelines import sources
from data_pipelines import synthetic
from data_pipelines import transforms

FLAGS = flags.FLAGS
flags.DEFINE_list('workers', ['0', '1', '2'], 'Numbers of grain worker processes to measure.')
flags.DEFINE_list('modes', ['exact', 'reduced'], 'Input paths to time: exact (official), reduced '
                  '(data.reduced_decode).')
flags.DEFINE_integer('num_images', 8, 'Synthetic training images.')
flags.DEFINE_integer('batches', 12, 'Batches timed per setting, after 2 warm-up batches.')
flags.DEFINE_integer('batch_size', 4, 'Examples per batch.')
flags.DEFINE_string('workdir', '', 'Where the synthetic data is written (default: a temporary folder).')


def _stage_times(record, config, repeats=5):
  """Mean milliseconds of the stages of one training example."""
  times = {}
  size = (record['height'], record['width'])
  full = codecs.decode_jpeg(record['image'])
  stages = {
      'jpeg decode (cv2, full size)': lambda: codecs.decode_jpeg(record['image'], 'bgr'),
      'dihedral rot90 (cv2, full size)': lambda: transforms.dihedral_copy(full, 1),
      'mask bits decode': lambda: codecs.decode_bits(record['mask_bits'], size),
  }
  for ratio in (0.5, 1.0, 2.0):
    target = transforms.rescale_size(size, config.img_scale, ratio)
    stages[f'cv2.resize to {target} (ratio {ratio})'] = (
        lambda t=target: transforms.resize_linear(full, t))
    stages[f'reduced: jpeg draft decode for ratio {ratio}'] = (
        lambda t=target: codecs.open_jpeg(record['image'], min_size=t))
  for name, fn in stages.items():
    start = time.process_time()
    for _ in range(repeats):
      fn()
    times[name] = (time.process_time() - start) / repeats * 1e3
  crop = np.random.default_rng(0).integers(0, 256, tuple(config.crop_size) + (3,), np.uint8)
  rng = np.random.default_rng(0)
  for name, fn in {
      'photometric (mean over draws)': lambda: transforms.photometric_distortion(crop, rng),
      'pad (uint8: the step normalises)': lambda: transforms.pad_to(crop, config.crop_size),
  }.items():
    start = time.process_time()
    for _ in range(repeats * 4):
      fn()
    times[name] = (time.process_time() - start) / (repeats * 4) * 1e3
  return times


def main(argv):
  del argv
  workdir = epath.Path(FLAGS.workdir or tempfile.mkdtemp(prefix='input_pipeline_'))
  data_dir = workdir / 'tfds'
  config = common.data_config('idrid')
  if not build.builder('idrid', data_dir).is_prepared():
    start = time.time()
    manual_dir = synthetic.write_download('idrid', workdir / 'download', image_size=(2848, 4288),
                                          num_images={'train': FLAGS.num_images, 'test': 1})
    print(f'wrote {FLAGS.num_images + 1} synthetic 4288x2848 images in {time.time() - start:.1f} s')
    start = time.time()
    build.build('idrid', manual_dir, data_dir)
    print(f'built in {time.time() - start:.1f} s')
  info = build.builder('idrid', data_dir).info
  train = info.splits['train']
  print(f'on disk: {train.num_bytes / train.num_examples / 2**20:.2f} MiB per example '
        f'({train.num_examples} examples, array_record)')

  source = sources.raw_source('idrid', 'train', data_dir)
  record = source[0]
  print(f'  JPEG {len(record["image"]) / 2**20:.2f} MiB, mask bits (zlib) '
        f'{len(record["mask_bits"]) / 2**10:.0f} KiB')
  for name, ms in _stage_times(record, config).items():
    print(f'  {name}: CPU {ms:.0f} ms')
  kwargs = dict(img_scale=tuple(config.img_scale), ratio_range=tuple(config.ratio_range),
                crop_size=tuple(config.crop_size))
  test = sources.raw_source('idrid', 'test', data_dir)
  for mode in ('exact', 'reduced'):
    reduced = mode == 'reduced'
    start = time.process_time()
    for seed in range(8):
      pipeline.train_example(source[seed % len(source)], np.random.default_rng(seed),
                             reduced_decode=reduced, **kwargs)
    print(f'{mode}: one training example in process: CPU '
          f'{(time.process_time() - start) / 8 * 1e3:.0f} ms (mean of 8)')
    start = time.process_time()
    example = pipeline.eval_example(test[0], img_scale=config.img_scale, mean=config.mean,
                                    std=config.std, reduced_decode=reduced)
    print(f'{mode}: one evaluation example: CPU {(time.process_time() - start) * 1e3:.0f} ms, image '
          f'{example["image"].shape}, masks {example["masks"].shape}')

  for mode in FLAGS.modes:
    config.reduced_decode = mode == 'reduced'
    for workers in (int(w) for w in FLAGS.workers):
      config.num_workers = workers
      iterator = pipeline.train_iterator(config, data_dir, batch_size=FLAGS.batch_size, seed=0)
      for _ in range(2):
        next(iterator)
      start = time.perf_counter()
      for _ in range(FLAGS.batches):
        batch = next(iterator)
      rate = FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)
      print(f'{mode}: train, {workers} worker(s): {rate:.1f} examples/s '
            f'(batch {batch["image"].shape} float32 + {batch["label"].shape} uint8)')
      del batch
      iterator.close()
  _input_fidelity(config)


def _dot_contrast(image, dots, scale):
  """Mean over dots of the largest |grey - median of the window's border| near each dot, in levels."""
  grey = image.astype(np.float32).mean(-1)
  values = []
  for y, x, r, _ in dots:
    iy, ix = round((y + 0.5) * scale - 0.5), round((x + 0.5) * scale - 0.5)
    half = int(np.ceil(r * scale)) + 2
    window = grey[iy - half:iy + half + 1, ix - half:ix + half + 1]
    border = np.concatenate([window[0], window[-1], window[:, 0], window[:, -1]])
    values.append(np.abs(window - np.median(border)).max())
  return float(np.mean(values))


def _input_fidelity(config):
  """The opt-in reduced decode against the official input on a dotted IDRiD-size JPEG."""
  data, dots = synthetic.dotted_jpeg()
  size = (2848, 4288)
  record = {'id': b'dots', 'image': data, 'height': size[0], 'width': size[1],
            'mask_bits': codecs.pack_bits([np.zeros(size, bool)])}
  official = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
  print(f'dotted {size[1]}x{size[0]} JPEG, {len(dots)} dots of radius 2-5 px: inputs against '
        'cv2.imdecode + cv2.resize(INTER_LINEAR)')
  plain = dict(mean=(0, 0, 0), std=(1, 1, 1))
  for ratio in (None, 0.5, 1.0, 2.0):  # None: the test path
    target = transforms.rescale_size(size, config.img_scale, ratio or 1.0)
    reference = cv2.resize(official, target[::-1], interpolation=cv2.INTER_LINEAR)
    row = []
    for reduced in (False, True):
      start = time.process_time()
      if ratio is None:
        image = pipeline.eval_example(record, img_scale=config.img_scale, reduced_decode=reduced,
                                      **plain)['image']
      else:  # the whole rescaled image as one crop: every training crop is a window of it
        image = pipeline.train_example(
            record, np.random.default_rng(0), img_scale=config.img_scale, ratio_range=(ratio, ratio),
            crop_size=target, dihedral=False, photometric=False,
            reduced_decode=reduced)['image'].astype(np.float32)
      ms = (time.process_time() - start) * 1e3
      diff = np.abs(image - reference)
      contrast = _dot_contrast(image, dots, target[1] / size[1]) / _dot_contrast(reference, dots,
                                                                                 target[1] / size[1])
      row.append(f'{"reduced" if reduced else "exact"} {ms:.0f} ms, |diff| max {diff.max():.0f} '
                 f'mean {diff.mean():.2f}, dot contrast x{contrast:.2f}')
    name = 'test path' if ratio is None else f'train ratio {ratio}'
    print(f'  {name} {target}: ' + '; '.join(row))


if __name__ == '__main__':
  app.run(main)
