"""Reporting scores: the paper's table (printed), metrics.json, per_image.csv, pr_curves.png, pictures/,
TensorBoard."""
import csv
import io
import json
import math
import re

from absl import logging
from etils import epath
import jax
import numpy as np
from PIL import Image

from data_pipelines.lesions import CLASSES
from m2mrf_jax import visualize

METRICS_FILE = 'metrics.json'
PR_CURVES_FILE = 'pr_curves.png'
PICTURES_DIR = 'pictures'  # one IMAGE_ID.png per picture of `evaluate.score`
PER_IMAGE_FILE = 'per_image.csv'


def format_table(scores: dict) -> str:
  """The paper's layout: AUPR, F and IoU per class and their mean, in percent (+ the fine AUPR)."""
  names = list(CLASSES) + ['mean']
  rows = [('AUPR', scores['aupr'], scores['mAUPR']), ('F', scores['f1'], scores['mF1']),
          ('IoU', scores['iou'], scores['mIoU'])]
  fine = len(scores['recall_fine'])
  rows.append((f'AUPR-{fine} (extra)', scores['aupr_fine'], scores['mAUPR_fine']))
  width = max(len(r[0]) for r in rows)
  lines = [' ' * width + ''.join(f'{n:>9}' for n in names)]
  for label, per_class, mean in rows:
    lines.append(f'{label:<{width}}' + ''.join(f'{100 * v:9.2f}' for v in (*per_class, mean)))
  lines.append(f'(%; official 11-threshold AUPR, F and IoU at prob > 0.5; AUPR-{fine} is the same curve '
               f'at {fine} thresholds, not in the paper)')
  return '\n'.join(lines)


def to_json(scores: dict) -> dict:
  """metrics.json content: fractions, per class by name, means, official 11-point curves."""
  out = {k: scores[k] for k in ('mAUPR', 'mIoU', 'mF1', 'mAUPR_fine')}
  for key in ('aupr', 'iou', 'f1', 'ppv', 'sensitivity', 'aupr_fine'):
    out[key] = dict(zip(CLASSES, np.asarray(scores[key]).tolist()))
  out['curve'] = {'thresholds': scores['thresholds'].tolist(),
                  'precision': dict(zip(CLASSES, scores['precision'].T.tolist())),
                  'recall': dict(zip(CLASSES, scores['recall'].T.tolist()))}
  if 'num_images' in scores:
    out['num_images'] = scores['num_images']
  return out


def per_image_csv(per_image: dict, fine_thresholds: int) -> str:
  """per_image.csv: one row per image, its `id`, then per class C (EX, HE, SE, MA), on its own pixels:

  C_aupr_11 and C_aupr_{fine_thresholds}: the official AUPR at 11 and at `fine_thresholds` thresholds;
  C_iou, C_f1 and C_dice (the same number as C_f1: 2 TP / (2 TP + FP + FN)) at prob > 0.5, as
  fractions; C_predicted_pixels (prob > 0.5) and C_true_pixels (ground truth). An empty cell is
  undefined (NaN): the AUPR where the image has no pixel of C, IoU, F1 and Dice where it has none
  and none is predicted.

  Args:
    per_image: `metrics.PooledCounts.image_result`: `ids` and (N, C) arrays.
    fine_thresholds: the thresholds of `aupr_fine`.
  """
  columns = [('aupr_11', 'aupr'), (f'aupr_{fine_thresholds}', 'aupr_fine'), ('iou', 'iou'),
             ('f1', 'f1'), ('dice', 'f1'), ('predicted_pixels', 'predicted'), ('true_pixels', 'true')]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['id'] + [f'{c}_{name}' for c in CLASSES for name, _ in columns])

  def cell(value):
    if isinstance(value, (int, np.integer)):
      return int(value)
    return '' if math.isnan(value) else repr(float(value))

  for row, image_id in enumerate(per_image['ids']):
    writer.writerow([image_id] + [cell(per_image[key][row][c]) for c in range(len(CLASSES))
                                  for _, key in columns])
  return out.getvalue()


def scalars(scores: dict) -> dict:
  """The scalar entries of a scores dict (mAUPR, mIoU, mF1, ...), for log.jsonl and TensorBoard."""
  return {k: v for k, v in scores.items() if isinstance(v, (int, float))}


def picture_file(image_id: str) -> str:
  """pictures/IMAGE_ID.png, characters other than letters, digits, '.', '-' and '_' replaced by '_'."""
  return f'{PICTURES_DIR}/{re.sub(r"[^A-Za-z0-9._-]", "_", image_id)}.png'


def write(scores: dict, workdir, writer=None, step: int = 0) -> None:
  """Prints the table, writes metrics.json, per_image.csv (if `scores['per_image']`), pr_curves.png and
  pictures/ into `workdir` (process 0 only).

  `scores['pictures']` (image id -> `evaluate.picture`), if present, become pictures/IMAGE_ID.png.
  With a `summary.Writer`, the PR curves also go to TensorBoard as the image 'pr_curves' at `step`,
  and the first picture as the image 'overlay'.
  """
  if jax.process_index() != 0:
    return
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  print(format_table(scores), flush=True)
  (workdir / METRICS_FILE).write_text(json.dumps(to_json(scores), indent=1))
  if 'per_image' in scores:
    fine = len(scores['recall_fine'])
    (workdir / PER_IMAGE_FILE).write_text(per_image_csv(scores['per_image'], fine))
  figure = visualize.pr_curves(scores)
  figure.savefig(workdir / PR_CURVES_FILE, dpi=100)
  pictures = scores.get('pictures', {})
  if pictures:
    (workdir / PICTURES_DIR).mkdir(exist_ok=True)
  for image_id, picture in pictures.items():
    Image.fromarray(picture).save(workdir / picture_file(image_id))
  if writer is not None:
    writer.write_image(step, 'pr_curves', visualize.to_array(figure))
    if pictures:
      writer.write_image(step, 'overlay', next(iter(pictures.values())))
  logging.info('wrote %s, %s, %s and %d pictures in %s', METRICS_FILE, PER_IMAGE_FILE, PR_CURVES_FILE,
               len(pictures), workdir)
