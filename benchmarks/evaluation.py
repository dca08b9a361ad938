"""Evaluation cost from logits: the official approach against m2mrf_jax's banded on-device counting.

  python benchmarks/evaluation.py [--images=27] [--height=2848] [--width=4288] [--test_size=956x1440]

Every approach runs in its own subprocess on the same synthetic images (IDRiD's test split: 27 label maps
of 2848 x 4288 and logits (4, 956, 1440) at the test scale) and reports its wall time (generation of the
inputs excluded), its peak resident memory (ru_maxrss) and its scores, printed side by side.
  official   mmseg's inference and my_metrics.py's sigmoid_metrics: per image torch bilinear resize of the
             logits to the original size (align_corners=False) and sigmoid, the (4, H, W) float32 map
             kept in a list; then for each of 11 thresholds, image and class `prob > t` counted in NumPy.
  m2mrf_jax  `metrics.count_resized` (what `evaluate.score` runs after the model): one jitted
             step per image on the default device, resize + sigmoid + histogram band by band of rows, so
             the full-resolution map never exists; 11 official and 1001 fine thresholds in one pass.
  counting   `metrics.PooledCounts` over the official approach's own probability maps: the same counts as
             NumPy's, so the scores must agree to 1e-12 (m2mrf_jax's maps differ from torch's by float32
             rounding of the interpolation, ~1 ulp, which moves a few pixels across a threshold).
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
  """Deterministic logits (4, h, w) float32 at the test scale and label map (H, W) uint8 (0 = bg)."""
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
  logits = rng.normal(-3.0, 1.5, (4, h, w)).astype(np.float32)
  logits += 4.0 * (small[None] == np.arange(1, 5, dtype=np.uint8)[:, None, None])
  return logits, label


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


def official(args):
  """torch resize + sigmoid per image into a list, then NumPy counting; (seconds, scores)."""
  import sklearn.metrics  # pylint: disable=g-import-not-at-top,unused-import (slow first import)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  results, labels, seconds = [], [], 0.0
  for i in range(args.images):
    logits, label = make_example(i, args.height, args.width, args.test_size)
    start = time.perf_counter()
    t = torch.nn.functional.interpolate(torch.from_numpy(logits)[None], size=(args.height, args.width),
                                        mode='bilinear', align_corners=False)
    results.append(torch.sigmoid(t)[0].numpy())  # mmseg keeps (C, H, W) float32 maps
    seconds += time.perf_counter() - start
    labels.append(label)
    del logits, t
  resize_s = seconds
  start = time.perf_counter()
  scores = official_counts(results, labels)
  seconds += time.perf_counter() - start
  scores['split'] = f'resize + sigmoid {resize_s:.1f} s, NumPy counting {seconds - resize_s:.1f} s'
  if args.save_probs:  # for the `counting` check, one file per map (no extra copy in memory)
    for i, result in enumerate(results):
      np.save(os.path.join(args.save_probs, f'{i}.npy'), result)
  return seconds, scores


def _scores(metrics, counter):
  result = counter.result()
  return dict(aupr=result['aupr'].tolist(), iou=result['iou'].tolist(), f1=result['f1'].tolist(),
              mAUPR_fine=result['mAUPR_fine'])


def m2mrf_jax(args):
  """metrics.count_resized per image (jitted, on the default device); (seconds, scores)."""
  import jax  # pylint: disable=g-import-not-at-top
  from m2mrf_jax import metrics  # pylint: disable=g-import-not-at-top
  counter = metrics.PooledCounts()
  step = jax.jit(lambda total, logits, masks, valid: metrics.count_resized(
      total, logits, masks, valid, counter.edges), donate_argnums=0)
  valid = np.ones((1,), bool)
  logits, label = make_example(0, args.height, args.width, args.test_size)
  shapes = (counter.total, logits.transpose(1, 2, 0)[None], label[None, ..., None].repeat(4, -1) > 0,
            valid)
  step = step.lower(*shapes).compile()  # compile excluded from the time
  del logits, label, shapes
  seconds = 0.0
  base_mib = _rss_mib()
  for i in range(args.images):
    logits, label = make_example(i, args.height, args.width, args.test_size)
    start = time.perf_counter()
    masks = label[None, ..., None] == np.arange(1, 5, dtype=np.uint8)  # as the pipeline's masks
    counter.total = step(counter.total, logits.transpose(1, 2, 0)[None], masks, valid)
    jax.block_until_ready(counter.total)
    seconds += time.perf_counter() - start
    del logits, label, masks
  start = time.perf_counter()
  scores = _scores(metrics, counter)
  seconds += time.perf_counter() - start
  return seconds, dict(scores, device=str(jax.devices()[0]), base_mib=base_mib)


def counting(args):
  """metrics.PooledCounts over the official approach's saved maps, one image at a time; (seconds, scores)."""
  import jax  # pylint: disable=g-import-not-at-top
  from m2mrf_jax import metrics  # pylint: disable=g-import-not-at-top
  counter = metrics.PooledCounts()
  shape = (1, args.height, args.width, 4)
  counter.update(np.zeros(shape, np.float32), np.zeros(shape, bool), valid=[False])  # compiles
  seconds = 0.0
  for i in range(args.images):
    _, label = make_example(i, args.height, args.width, args.test_size)
    probs = np.load(os.path.join(args.save_probs, f'{i}.npy'))
    probs = np.ascontiguousarray(probs.transpose(1, 2, 0))
    start = time.perf_counter()
    masks = label[..., None] == np.arange(1, 5, dtype=np.uint8)
    counter.update(probs[None], masks[None])
    jax.block_until_ready(counter.total)
    seconds += time.perf_counter() - start
    del probs, masks
  start = time.perf_counter()
  scores = _scores(metrics, counter)
  return seconds + time.perf_counter() - start, scores


def breakdown(args):
  """Seconds per image of the parts of m2mrf_jax's step, each jitted alone on image 0."""
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
  parts = {
      'masks from the label map (host)': (
          lambda: label[None, ..., None] == np.arange(1, 5, dtype=np.uint8), ()),
      'resize (whole map)': (jax.jit(lambda x: layers.resize_bilinear(x, size)), (logits,)),
      'resize + sigmoid (whole map)': (jax.jit(lambda x: jax.nn.sigmoid(layers.resize_bilinear(x, size))),
                                       (logits,)),
      'bin index of the probabilities': (jax.jit(lambda p: metrics.bin_index(p, edges)), (probs,)),
      'histogram of the probabilities': (jax.jit(lambda p, m: metrics.histogram(p, m, valid, edges)),
                                         (probs, masks)),
      'count_resized (banded, all of it)': (jax.jit(lambda x, m: metrics.resized_histogram(
          x, m, valid, edges)), (logits, masks)),
  }
  times = {}
  for name, (fn, inputs) in parts.items():
    jax.block_until_ready(fn(*inputs))
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times[name] = time.perf_counter() - start
  return 0.0, dict(parts=times)


APPROACHES = {'official': official, 'm2mrf_jax': m2mrf_jax, 'counting': counting,
              'breakdown': breakdown}


def _rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args):
  seconds, scores = APPROACHES[args.approach](args)
  peak_mib = _rss_mib()
  print(json.dumps(dict(seconds=seconds, peak_mib=peak_mib, **scores)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', type=int, default=27)
  parser.add_argument('--height', type=int, default=2848)
  parser.add_argument('--width', type=int, default=4288)
  parser.add_argument('--test_size', default='956x1440', help='HxW of the logits')
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
    for approach in APPROACHES:
      cmd = [sys.executable, __file__, f'--approach={approach}', f'--images={args.images}',
             f'--height={args.height}', f'--width={args.width}',
             f'--test_size={args.test_size[0]}x{args.test_size[1]}', f'--save_probs={tmp}']
      out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root,
                           env={**os.environ, 'PYTHONPATH': root})
      rows[approach] = json.loads(out.stdout.strip().splitlines()[-1])
  parts = rows.pop('breakdown')['parts']
  base = rows['official']
  print(f'{"approach":<11}{"time (s)":>9}{"x faster":>9}{"peak RSS (MiB)":>15}{"of official":>12}'
        f'{"mAUPR %":>9}{"mIoU %":>9}{"mF1 %":>9}{"max |diff|":>11}')
  for approach, row in rows.items():
    diff = max(np.abs(np.subtract(row[k], base[k])).max() for k in ('aupr', 'iou', 'f1'))
    print(f'{approach:<11}{row["seconds"]:>9.1f}{base["seconds"] / row["seconds"]:>9.1f}'
          f'{row["peak_mib"]:>15.0f}{row["peak_mib"] / base["peak_mib"]:>12.3f}'
          f'{100 * np.mean(row["aupr"]):>9.4f}{100 * np.mean(row["iou"]):>9.4f}'
          f'{100 * np.mean(row["f1"]):>9.4f}{diff:>11.1e}')
  ours = rows['m2mrf_jax']
  print(f'm2mrf_jax device: {ours["device"]}; its fine 1001-threshold mAUPR '
        f'{100 * ours["mAUPR_fine"]:.4f}; its peak RSS above the {ours["base_mib"]:.0f} MiB of the '
        f'imported and compiled runtime: {ours["peak_mib"] - ours["base_mib"]:.0f} MiB')
  print(f'official: {base["split"]}')
  print('m2mrf_jax, per image (each part jitted alone, image 0): ' +
        ', '.join(f'{name} {1e3 * t:.0f} ms' for name, t in parts.items()))
  print('counting: per-class AUPR, IoU, F1 equal to the official ones to 1e-12:',
        all(np.allclose(rows['counting'][k], base[k], rtol=1e-12, atol=0) for k in ('aupr', 'iou', 'f1')))


if __name__ == '__main__':
  main()
