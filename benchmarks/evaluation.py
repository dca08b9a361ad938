"""Evaluation cost from logits: the official approach against m2mrf_jax's banded on-device counting.

  python benchmarks/evaluation.py [--images=27] [--height=2848] [--width=4288] [--test_size=956x1440]
                                 [--devices=1,2]

Every approach runs in its own subprocess, one after the other, on the same synthetic images (IDRiD's
test split: 27 label maps of 2848 x 4288 and logits (4, 956, 1440) at the test scale) and reports the
wall and CPU seconds (all threads) of its work (generation of the inputs excluded), its peak resident
memory (ru_maxrss), the peak above its RSS after imports and compilation, and its scores, side by side.
  official   mmseg's inference and my_metrics.py's sigmoid_metrics: per image torch bilinear resize of the
             logits to the original size (align_corners=False) and sigmoid, the (4, H, W) float32 map
             kept in a list; then for each of 11 thresholds, image and class `prob > t` counted in NumPy.
  m2mrf_jax  `metrics.count_resized` (what `evaluate.score` runs after the model): one jitted
             step per image from the logits and the masks packed into bits, resize + sigmoid + histogram
             band by band of rows, so the full-resolution map never exists; 11 official and 1001 fine
             thresholds, pooled and per image, in one pass. `m2mrf_jax xD`: the same with D CPU devices
             in the process (`--devices`), D images a step split over them, as evaluate.score does.
  counting   `metrics.PooledCounts` over the official approach's own probability maps: the same counts as
             NumPy's, so the scores must agree to 1e-12 (m2mrf_jax's maps differ from torch's by float32
             rounding of the interpolation, ~1 ulp, which moves a few pixels across a threshold).
  breakdown  the parts of m2mrf_jax's step on one image, each jitted alone.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

CLASSES = ('EX', 'HE', 'SE', 'MA')


def make_example(index, height, width, test_size):
  """Deterministic logits (4, h, w) float32 at the test scale and label map (H, W) uint8 (0 = bg).

  Generated in float32 and in place, so that the inputs of one image are all a child holds besides
  what its approach keeps (the peak memory is the approach's).
  """
  rng = np.random.default_rng(index)
  label = np.zeros((height, width), np.uint8)
  for cls, count, size in ((1, 60, 40), (2, 30, 60), (3, 4, 120), (4, 300, 6)):
    ys = rng.integers(0, height - size, count)
    xs = rng.integers(0, width - size, count)
    for y, x in zip(ys, xs):
      label[y:y + size, x:x + size] = cls
  h, w = test_size
  rows = np.arange(h) * height // h
  cols = np.arange(w) * width // w
  small = label[rows][:, cols]  # nearest-neighbour label at the test scale
  logits = rng.standard_normal((4, h, w), dtype=np.float32)
  logits *= np.float32(1.5)
  logits -= np.float32(3.0)
  for cls in range(1, 5):
    logits[cls - 1][small == cls] += np.float32(4.0)
  return logits, label


def mask_bits(label):
  """`metrics.pack_masks` of the one-hot masks of a label map (H, W) uint8: label k > 0 -> bit k - 1."""
  return (np.uint8(1) << label) >> np.uint8(1)


def official_counts(results, labels):
  """my_metrics.sigmoid_metrics: per threshold, image and class NumPy counts; returns scores."""
  from sklearn.metrics import auc  # pylint: disable=g-import-not-at-top (imported before the timing)
  threshs = np.linspace(0, 1, 11)
  tp, pos, fn = (np.zeros((len(threshs), 5)) for _ in range(3))
  for k, thresh in enumerate(threshs):
    for result, label in zip(results, labels):
      for i in range(1, 5):
        pred = result[i - 1] > np.float32(thresh)  # float32, as NumPy < 1.24 compared
        gt = label == i
        tp[k, i] += np.sum(gt & pred)
        pos[k, i] += np.sum(pred)
        fn[k, i] += np.sum(gt) - np.sum(gt & pred)
  with np.errstate(invalid='ignore', divide='ignore'):
    ppv = np.nan_to_num(tp / pos, nan=1)
    sens = np.nan_to_num(tp / (tp + fn), nan=0)
    iou = np.nan_to_num(tp[5] / (pos[5] + fn[5]))[1:]
    f1 = np.nan_to_num(2 * tp[5] / (pos[5] + tp[5] + fn[5]))[1:]
  aupr = np.array([auc(sens[:, i], ppv[:, i]) for i in range(1, 5)])
  return dict(aupr=aupr.tolist(), iou=iou.tolist(), f1=f1.tolist())


class Timer:
  """Wall and CPU (all threads of the process) seconds spent inside `with timer:` blocks."""

  def __init__(self):
    self.wall = self.cpu = 0.0

  def __enter__(self):
    self._start = time.perf_counter(), time.process_time()

  def __exit__(self, *exc):
    self.wall += time.perf_counter() - self._start[0]
    self.cpu += time.process_time() - self._start[1]


def official(args):
  """torch resize + sigmoid per image into a list, then NumPy counting; (timer, scores)."""
  import sklearn.metrics  # pylint: disable=g-import-not-at-top,unused-import (slow first import)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  results, labels, timer = [], [], Timer()
  base_mib = _rss_mib()
  for i in range(args.images):
    logits, label = make_example(i, args.height, args.width, args.test_size)
    with timer:
      t = torch.nn.functional.interpolate(torch.from_numpy(logits)[None], size=(args.height, args.width),
                                          mode='bilinear', align_corners=False)
      results.append(torch.sigmoid(t)[0].numpy())  # mmseg keeps (C, H, W) float32 maps
    labels.append(label)
    del logits, t
  resize_s = timer.wall
  with timer:
    scores = official_counts(results, labels)
  scores['split'] = f'resize + sigmoid {resize_s:.1f} s, NumPy counting {timer.wall - resize_s:.1f} s'
  if args.save_probs:  # for the `counting` check, one file per map (no extra copy in memory)
    for i, result in enumerate(results):
      np.save(os.path.join(args.save_probs, f'{i}.npy'), result)
  return timer, dict(scores, base_mib=base_mib)


def _scores(counter):
  result, per_image = counter.result(), counter.image_result()
  return dict(aupr=result['aupr'].tolist(), iou=result['iou'].tolist(), f1=result['f1'].tolist(),
              mAUPR_fine=result['mAUPR_fine'], images=len(per_image['ids']))


def m2mrf_jax(args):
  """metrics.count_resized as evaluate.score runs it, one image per device of this process a step.

  With one device, one jitted step an image; with D (CPU devices: XLA_FLAGS=
  --xla_force_host_platform_device_count=D), batches of D images split over a 'data' mesh with shard_map,
  each device counting its image, as `evaluate.make_eval_step` does. (timer, scores).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from m2mrf_jax import metrics  # pylint: disable=g-import-not-at-top
  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ('data',))
  counter = metrics.PooledCounts(mesh=mesh)
  step = jax.jit(jax.shard_map(
      lambda total, logits, masks, valid: metrics.count_resized(
          total, logits, masks, valid, counter.edges, 'data'),
      mesh=mesh, in_specs=(P(), P('data'), P('data'), P('data')), out_specs=(P(), P('data')),
      check_vma=False),
      donate_argnums=0)
  h, w = args.test_size
  rows = NamedSharding(mesh, P('data'))
  shapes = (counter.total, jax.ShapeDtypeStruct((devices, h, w, 4), np.float32, sharding=rows),
            jax.ShapeDtypeStruct((devices, args.height, args.width), np.uint8, sharding=rows),
            jax.ShapeDtypeStruct((devices,), bool, sharding=rows))
  step = step.lower(*shapes).compile()  # compile excluded from the time
  timer = Timer()
  base_mib = _rss_mib()
  for first in range(0, args.images, devices):
    batch = [make_example(min(i, args.images - 1), args.height, args.width, args.test_size)
             for i in range(first, first + devices)]  # the last batch padded with its last image
    valid = np.arange(first, first + devices) < args.images
    with timer:
      logits = np.stack([l.transpose(1, 2, 0) for l, _ in batch])
      masks = np.stack([mask_bits(label) for _, label in batch])
      inputs = jax.device_put((logits, masks, valid), rows)
      counter.total, hist = step(counter.total, *inputs)
      counter.add_images(hist, valid)  # per-image counts, as evaluate.score keeps them
      jax.block_until_ready(counter.total)
    del batch, logits, masks, inputs
  with timer:
    scores = _scores(counter)  # pooled and per-image scores
  return timer, dict(scores, device=f'{devices} x {jax.devices()[0].platform}', base_mib=base_mib)


def counting(args):
  """metrics.PooledCounts over the official approach's saved maps, one image at a time; (timer, scores)."""
  import jax  # pylint: disable=g-import-not-at-top
  from m2mrf_jax import metrics  # pylint: disable=g-import-not-at-top
  counter = metrics.PooledCounts()
  shape = (1, args.height, args.width, 4)
  counter.update(np.zeros(shape, np.float32), np.zeros(shape, bool), valid=[False])  # compiles
  timer = Timer()
  base_mib = _rss_mib()
  for i in range(args.images):
    _, label = make_example(i, args.height, args.width, args.test_size)
    probs = np.load(os.path.join(args.save_probs, f'{i}.npy'))
    probs = np.ascontiguousarray(probs.transpose(1, 2, 0))
    with timer:
      masks = label[..., None] == np.arange(1, 5, dtype=np.uint8)
      counter.update(probs[None], masks[None])
      jax.block_until_ready(counter.total)
    del probs, masks
  with timer:
    scores = _scores(counter)
  return timer, dict(scores, base_mib=base_mib)


def breakdown(args):
  """Wall and CPU seconds of the parts of m2mrf_jax's step on one image, each jitted alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from m2mrf_jax import layers  # pylint: disable=g-import-not-at-top
  from m2mrf_jax import metrics  # pylint: disable=g-import-not-at-top
  logits, label = make_example(0, args.height, args.width, args.test_size)
  logits = jnp.asarray(logits.transpose(1, 2, 0)[None])
  masks = label[None, ..., None] == np.arange(1, 5, dtype=np.uint8)
  size = (args.height, args.width)
  edges = jnp.asarray(metrics.float32_thresholds(1001))
  valid = jnp.ones((1,), bool)
  probs = jax.jit(lambda x: jax.nn.sigmoid(layers.resize_bilinear(x, size)))(logits)
  bits = mask_bits(label)[None]
  parts = {
      'mask bits from the label map (host)': (lambda: mask_bits(label), ()),
      'pack_masks of (H, W, 4) bool masks (host, evaluate.score\'s path)': (
          lambda: metrics.pack_masks(masks), ()),
      'resize + sigmoid (whole map)': (jax.jit(lambda x: jax.nn.sigmoid(layers.resize_bilinear(x, size))),
                                       (logits,)),
      'bin index (whole map)': (jax.jit(lambda p: metrics.bin_index(p, edges)), (probs,)),
      'histogram (bin index + scatter, whole map)': (
          jax.jit(lambda p, m: metrics.histogram(p, m, valid, edges)), (probs, masks)),
      'count_resized (banded, all of it)': (jax.jit(lambda x, m: metrics.resized_histogram(
          x, m, valid, edges)), (logits, bits)),
  }
  times = {}
  for name, (fn, inputs) in parts.items():
    jax.block_until_ready(fn(*inputs))
    timer = Timer()
    with timer:
      jax.block_until_ready(fn(*inputs))
    times[name] = (timer.wall, timer.cpu)
  return Timer(), dict(parts=times)


APPROACHES = {'official': official, 'm2mrf_jax': m2mrf_jax, 'counting': counting,
              'breakdown': breakdown}


def _rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args):
  timer, scores = APPROACHES[args.approach](args)
  peak_mib = _rss_mib()
  print(json.dumps(dict(seconds=timer.wall, cpu_seconds=timer.cpu, peak_mib=peak_mib, **scores)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', type=int, default=27)
  parser.add_argument('--height', type=int, default=2848)
  parser.add_argument('--width', type=int, default=4288)
  parser.add_argument('--test_size', default='956x1440', help='HxW of the logits')
  parser.add_argument('--devices', default='1,2',
                      help='m2mrf_jax rows: CPU devices of the process (images counted at once)')
  parser.add_argument('--approach', choices=tuple(APPROACHES), help=argparse.SUPPRESS)
  parser.add_argument('--save_probs', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.test_size = tuple(int(v) for v in args.test_size.split('x'))
  if args.approach:
    run_child(args)
    return
  print(f'{args.images} images of {args.height} x {args.width}, logits 4 x {args.test_size[0]} x '
        f'{args.test_size[1]}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}', flush=True)
  rows = {}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    runs = [('official', 'official', 1)]
    runs += [('m2mrf_jax' + (f' x{d}' if d > 1 else ''), 'm2mrf_jax', d)
             for d in map(int, args.devices.split(','))]
    runs += [('counting', 'counting', 1), ('breakdown', 'breakdown', 1)]
    for name, approach, devices in runs:
      cmd = [sys.executable, __file__, f'--approach={approach}', f'--images={args.images}',
             f'--height={args.height}', f'--width={args.width}',
             f'--test_size={args.test_size[0]}x{args.test_size[1]}', f'--save_probs={tmp}']
      env = {**os.environ, 'PYTHONPATH': root,
             'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
      out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root, env=env)
      rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
  parts = rows.pop('breakdown')['parts']
  base = rows['official']
  print(f'{"approach":<13}{"time (s)":>9}{"x faster":>9}{"CPU (s)":>9}{"x less":>8}'
        f'{"peak RSS (MiB)":>15}{"of official":>12}{"above base":>11}'
        f'{"mAUPR %":>9}{"mIoU %":>9}{"mF1 %":>9}{"max |diff|":>11}')
  for approach, row in rows.items():
    diff = max(np.abs(np.subtract(row[k], base[k])).max() for k in ('aupr', 'iou', 'f1'))
    print(f'{approach:<13}{row["seconds"]:>9.1f}{base["seconds"] / row["seconds"]:>9.1f}'
          f'{row["cpu_seconds"]:>9.1f}{base["cpu_seconds"] / row["cpu_seconds"]:>8.1f}'
          f'{row["peak_mib"]:>15.0f}{row["peak_mib"] / base["peak_mib"]:>12.3f}'
          f'{row["peak_mib"] - row["base_mib"]:>11.0f}'
          f'{100 * np.mean(row["aupr"]):>9.4f}{100 * np.mean(row["iou"]):>9.4f}'
          f'{100 * np.mean(row["f1"]):>9.4f}{diff:>11.1e}')
  ours = rows['m2mrf_jax']
  print(f'(time: wall seconds of the timed work; CPU: its user + system seconds over all threads, less '
        f'sensitive to other load; "above base": peak RSS minus the RSS after imports and compilation, '
        f'official {base["base_mib"]:.0f} MiB, m2mrf_jax {ours["base_mib"]:.0f} MiB)')
  print(f'm2mrf_jax device: {ours["device"]}; its fine 1001-threshold mAUPR '
        f'{100 * ours["mAUPR_fine"]:.4f}; per-image scores of {ours["images"]} images included')
  print(f'official: {base["split"]}')
  print('m2mrf_jax, one image (each part jitted alone, image 0), wall / CPU: ' +
        ', '.join(f'{name} {1e3 * t[0]:.0f} / {1e3 * t[1]:.0f} ms' for name, t in parts.items()))
  print('counting: per-class AUPR, IoU, F1 equal to the official ones to 1e-12:',
        all(np.allclose(rows['counting'][k], base[k], rtol=1e-12, atol=0) for k in ('aupr', 'iou', 'f1')))


if __name__ == '__main__':
  main()
