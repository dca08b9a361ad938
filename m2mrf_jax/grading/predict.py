"""DR grade and lesion maps for fundus photographs.

  python -m m2mrf_jax.grading.predict --config=configs/ddr_grading.py --checkpoint=DIR IMAGE... --output=DIR

Per input image `NAME.ext` (JPEG, PNG, TIFF, any size) it prints the grade and its class probabilities
and writes into the output folder
  NAME_grade.json                {"grade": 2, "name": "moderate", "probabilities": {"none": ..., ...}}
  NAME_prob_{EX,HE,SE,MA}.png    the side branch's 16-bit lesion probability maps at the original size
  NAME_mask_{EX,HE,SE,MA}.png    prob > 0.5
  NAME_overlay.png               the masks on the image (EX red, HE green, SE yellow, MA blue)
and `grades.csv` (one row per image: name, grade, probabilities). The photograph is fitted into the
config's `data.image_size` square as in training; the lesion logits are cropped to the photograph and
resized bilinearly to its original size before the sigmoid. An unreadable input is reported by name
and skipped; the exit status is then 1.
"""
import json
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import nnx
import jax
import numpy as np

from data_pipelines import grading_pipeline
from data_pipelines import transforms
from m2mrf_jax import layers
from m2mrf_jax import predict as seg_predict
from m2mrf_jax.grading import metrics

FLAGS = flags.FLAGS


def grade_names(num_classes):
  return (metrics.GRADES + (metrics.UNGRADABLE,))[:num_classes]


class Grader:
  """SiAN in eval mode: photographs -> (grade probabilities, lesion probabilities at their size)."""

  def __init__(self, model: nnx.Module, image_size: int):
    graphdef, state = nnx.split(model)
    eval_model = nnx.merge(graphdef, state)
    eval_model.eval()
    self.graphdef, self.state = nnx.split(eval_model)
    self.image_size = image_size
    self._forward = jax.jit(self._apply)

  def _apply(self, state, images):
    logits, lesions = nnx.merge(self.graphdef, state)(images)
    return jax.nn.softmax(logits), lesions

  def __call__(self, images):
    """uint8 (H_i, W_i, 3) images -> list of ((K,) grade probabilities, (H_i, W_i, 4) or None)."""
    boxes = [grading_pipeline.square_box(im.shape[:2], self.image_size) for im in images]
    squares = np.stack([grading_pipeline.pad_square(transforms.resize_antialiased(im, box[2:]),
                                                    self.image_size) for im, box in zip(images, boxes)])
    probs, lesions = self._forward(self.state, squares)
    out = []
    for i, (image, (top, left, h, w)) in enumerate(zip(images, boxes)):
      maps = None
      if lesions is not None:
        full = layers.resize_bilinear(lesions[i:i + 1], (self.image_size, self.image_size))
        maps = layers.resize_bilinear(full[:, top:top + h, left:left + w], image.shape[:2])
        maps = np.asarray(jax.nn.sigmoid(maps[0]))
      out.append((np.asarray(probs[i]), maps))
    return out


def describe(stem, probs, names):
  """'NAME: grade 2 (moderate)  none 0.010  mild 0.050 ...'."""
  grade = int(np.argmax(probs))
  return f'{stem}: grade {grade} ({names[grade]})  ' + '  '.join(
      f'{n} {p:.3f}' for n, p in zip(names, probs))


def write_outputs(folder, stem, image, probs, maps, names):
  """NAME_grade.json and, when the model has a side branch, the lesion maps, masks and overlay."""
  grade = int(np.argmax(probs))
  record = {'grade': grade, 'name': names[grade],
            'probabilities': {n: float(p) for n, p in zip(names, probs)}}
  (epath.Path(folder) / f'{stem}_grade.json').write_text(json.dumps(record, indent=1))
  if maps is not None:
    seg_predict.write_outputs(folder, stem, image, maps)


def run(model, config, inputs, output, batch_size=4):
  """Grades every input into `output`; returns the inputs that could not be read."""
  output = epath.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  stems = [epath.Path(p).stem for p in inputs]
  duplicates = sorted({s for s in stems if stems.count(s) > 1})
  if duplicates:
    raise ValueError(f'inputs share the names {duplicates}: their outputs would collide')
  names = grade_names(config.model.num_classes)
  grader = Grader(model, int(config.data.image_size))
  failed, rows, pending = [], [], []

  def flush():
    for (path, image), (probs, maps) in zip(pending, grader([im for _, im in pending])):
      stem = epath.Path(path).stem
      print(describe(stem, probs, names), flush=True)
      write_outputs(output, stem, image, probs, maps, names)
      rows.append([stem, str(int(np.argmax(probs)))] + [f'{p:.6f}' for p in probs])
    pending.clear()

  for path in inputs:
    try:
      pending.append((path, seg_predict.read_image(path)))
    except ValueError as e:
      print(f'skipped: {e}', file=sys.stderr, flush=True)
      failed.append(str(path))
    if len(pending) == batch_size:
      flush()
  if pending:
    flush()
  header = ['name', 'grade'] + [f'p_{n}' for n in names]
  (output / 'grades.csv').write_text('\n'.join(','.join(r) for r in [header] + rows) + '\n')
  return failed


def main(argv):
  # pylint: disable=g-import-not-at-top (slow imports, after flags)
  from m2mrf_jax import checkpoints
  from m2mrf_jax import console
  from m2mrf_jax.grading import train
  console.setup(FLAGS.verbosity)
  inputs = argv[1:]
  if not FLAGS.checkpoint:
    raise app.UsageError('--checkpoint is required: an orbax checkpoint directory of a grading run')
  if not FLAGS.output:
    raise app.UsageError('--output is required: the folder for the grades and lesion maps')
  if not inputs:
    raise app.UsageError('no input images given')
  config = FLAGS.config
  checkpoints.checked_card(FLAGS.checkpoint, config)
  model = train.restore(FLAGS.checkpoint, config.model)
  failed = run(model, config, inputs, FLAGS.output, batch_size=FLAGS.batch_size)
  logging.info('graded %d of %d images into %s', len(inputs) - len(failed), len(inputs), FLAGS.output)
  if failed:
    print(f'{len(failed)} of {len(inputs)} inputs failed: {", ".join(failed)}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  # --config, --checkpoint, --output and --batch_size are m2mrf_jax.predict's flags (defined on import).
  flags.mark_flags_as_required(['config'])
  app.run(main)
