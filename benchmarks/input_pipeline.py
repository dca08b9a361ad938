"""Training input pipeline throughput on IDRiD-sized (4288x2848) synthetic data.

  python -m benchmarks.input_pipeline [--workers=0,1,2] [--num_images=8] [--batches=12]

Prints the size of an example on disk, the CPU time of one training and one evaluation example in
process (and of each stage), and training examples/s for each number of workers. On a shared machine
the wall-clock rates understate an idle one; CPU times are less affected (2 cores / CPU time per
example bounds the 2-worker rate).
"""
import tempfile
import time

from absl import app
from absl import flags
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
flags.DEFINE_integer('num_images', 8, 'Synthetic training images.')
flags.DEFINE_integer('batches', 12, 'Batches timed per setting, after 2 warm-up batches.')
flags.DEFINE_integer('batch_size', 4, 'Examples per batch.')
flags.DEFINE_string('workdir', '', 'Where the synthetic data is written (default: a temporary folder).')


def _stage_times(record, config, repeats=5):
  """Mean milliseconds of the stages of one training example at ratio 1 (draft 1/2) and 2 (full)."""
  times = {}
  size = (record['height'], record['width'])
  for ratio in (1.0, 2.0):
    target = transforms.rescale_size((record['height'], record['width']), config.img_scale, ratio)
    stages = {
        f'jpeg decode for ratio {ratio}': lambda t=target: codecs.open_jpeg(record['image'], min_size=t),
        'mask bits decode': lambda: codecs.decode_bits(record['mask_bits'], size),
    }
    for name, fn in stages.items():
      start = time.process_time()
      for _ in range(repeats):
        fn()
      times[name] = (time.process_time() - start) / repeats * 1e3
  crop = np.random.default_rng(0).integers(0, 256, tuple(config.crop_size) + (3,), np.uint8)
  rng = np.random.default_rng(0)
  for name, fn in {
      'photometric (mean over draws)': lambda: transforms.photometric_distortion(crop, rng),
      'normalize + pad': lambda: transforms.pad_to(transforms.normalize(crop, config.mean, config.std),
                                                   config.crop_size),
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
                crop_size=tuple(config.crop_size), mean=config.mean, std=config.std)
  start = time.process_time()
  for seed in range(8):
    pipeline.train_example(source[seed % len(source)], np.random.default_rng(seed), **kwargs)
  print(f'one training example in process: CPU {(time.process_time() - start) / 8 * 1e3:.0f} ms (mean of 8)')
  test = sources.raw_source('idrid', 'test', data_dir)
  start = time.process_time()
  example = pipeline.eval_example(test[0], img_scale=config.img_scale, mean=config.mean, std=config.std)
  print(f'one evaluation example: CPU {(time.process_time() - start) * 1e3:.0f} ms, image '
        f'{example["image"].shape}, masks {example["masks"].shape}')

  for workers in (int(w) for w in FLAGS.workers):
    config.num_workers = workers
    iterator = pipeline.train_iterator(config, data_dir, batch_size=FLAGS.batch_size, seed=0)
    for _ in range(2):
      next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
      batch = next(iterator)
    rate = FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)
    print(f'train, {workers} worker(s): {rate:.1f} examples/s '
          f'(batch {batch["image"].shape} float32 + {batch["label"].shape} uint8)')
    del batch
    iterator.close()


if __name__ == '__main__':
  app.run(main)
