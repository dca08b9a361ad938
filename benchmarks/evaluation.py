"""Evaluation cost: the official approach (all maps in memory, NumPy counting) against streaming counts.

  python benchmarks/evaluation.py [--images=27] [--height=2848] [--width=4288]

Each approach runs in its own subprocess on the same synthetic probability maps and label maps
(IDRiD test split: 27 maps of 4 x 2848 x 4288), and reports its wall time (generation of the maps
excluded), its peak resident memory (ru_maxrss) and its scores, printed side by side.
  official   my_metrics.py's sigmoid_metrics: a list of (4, H, W) float32 maps and (H, W) label maps,
             then for each of 11 thresholds, each image and each class `prob > t` counted with NumPy.
  streaming  m2mrf_jax.metrics.PooledCounts: one jitted histogram update per image on the default device,
             the map dropped after its update; 11 official and 1001 fine thresholds in the same pass.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def make_example(index, height, width):
  """Deterministic probability map (H, W, 4) float32 and exclusive label map (H, W) uint8 (0 = bg)."""
  rng = np.random.default_rng(index)
  label = np.zeros((height, width), np.uint8)
  for cls, count, size in ((1, 60, 40), (2, 30, 60), (3, 4, 120), (4, 300, 6)):
    ys = rng.integers(0, height - size, count)
    xs = rng.integers(0, width - size, count)
    for y, x in zip(ys, xs):
      label[y:y + size, x:x + size] = cls
  probs = rng.random((height, width, 4), dtype=np.float32)
  probs **= 4
  for c in range(4):
    hit = label == c + 1
    probs[..., c][hit] = np.sqrt(probs[..., c][hit])
  return probs, label


def official(args):
  """All maps in memory, then my_metrics.sigmoid_metrics's NumPy counting; returns (seconds, scores)."""
  from sklearn.metrics import auc  # pylint: disable=g-import-not-at-top
  results, labels = [], []
  for i in range(args.images):
    probs, label = make_example(i, args.height, args.width)
    results.append(np.ascontiguousarray(probs.transpose(2, 0, 1)))  # mmseg keeps (C, H, W)
    labels.append(label)
    del probs
  start = time.perf_counter()
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
  aupr = np.array([auc(sens[:, i], ppv[:, i]) for i in range(1, 5)])
  return time.perf_counter() - start, dict(aupr=aupr.tolist(), mAUPR=aupr.mean(), mIoU=iou.mean())


def streaming(args):
  """m2mrf_jax.metrics.PooledCounts over the same maps, one image at a time; returns (seconds, scores)."""
  import jax  # pylint: disable=g-import-not-at-top
  from m2mrf_jax import metrics  # pylint: disable=g-import-not-at-top
  counter = metrics.PooledCounts()
  total = 0.0
  for i in range(args.images):
    probs, label = make_example(i, args.height, args.width)
    masks = label[..., None] == np.arange(1, 5, dtype=np.uint8)
    start = time.perf_counter()
    counter.update(probs[None], masks[None])
    jax.block_until_ready(counter.total)
    total += time.perf_counter() - start
    del probs, masks, label
  start = time.perf_counter()
  scores = counter.result()
  total += time.perf_counter() - start
  return total, dict(aupr=scores['aupr'].tolist(), mAUPR=scores['mAUPR'], mIoU=scores['mIoU'],
                     mAUPR_fine=scores['mAUPR_fine'], device=str(jax.devices()[0]))


def run_child(args):
  seconds, scores = {'official': official, 'streaming': streaming}[args.approach](args)
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(dict(seconds=seconds, peak_mib=peak_mib, **scores)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', type=int, default=27)
  parser.add_argument('--height', type=int, default=2848)
  parser.add_argument('--width', type=int, default=4288)
  parser.add_argument('--approach', choices=('official', 'streaming'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.approach:
    run_child(args)
    return
  print(f'{args.images} probability maps of 4 x {args.height} x {args.width} '
        f'({args.images * 4 * args.height * args.width * 4 / 2**30:.2f} GiB float32)', flush=True)
  rows = {}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for approach in ('official', 'streaming'):
    cmd = [sys.executable, __file__, f'--approach={approach}', f'--images={args.images}',
           f'--height={args.height}', f'--width={args.width}']
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root,
                         env={**os.environ, 'PYTHONPATH': root})
    rows[approach] = json.loads(out.stdout.strip().splitlines()[-1])
  print(f'{"approach":<12}{"time (s)":>10}{"peak RSS (MiB)":>16}{"mAUPR":>10}{"mIoU":>10}')
  for approach, row in rows.items():
    print(f'{approach:<12}{row["seconds"]:>10.1f}{row["peak_mib"]:>16.0f}'
          f'{100 * row["mAUPR"]:>10.4f}{100 * row["mIoU"]:>10.4f}')
  print(f'streaming device: {rows["streaming"]["device"]}; fine 1001-threshold mAUPR '
        f'{100 * rows["streaming"]["mAUPR_fine"]:.4f}')
  print('per-class AUPR equal:', np.allclose(rows['official']['aupr'], rows['streaming']['aupr'],
                                            rtol=1e-12, atol=0))


if __name__ == '__main__':
  main()
