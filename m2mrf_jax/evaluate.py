"""Scoring a model over a split as the official test (`score`), and the evaluate-mode job.

Per image: the model (eval mode) at the test scale gives logits (1, h', w', 4), which are resized
bilinearly (align_corners=False, no antialiasing) to the original size, passed through the sigmoid, and
counted against the full-resolution masks band by band of rows (`metrics.count_resized`: the
full-resolution map never exists at once), all in one jitted step on device. A batch
holds images of one size, `config.eval_batch_size` per device, split over the devices of this process
(grain decodes the next images in threads meanwhile); each process scores its share of the split
(`data_pipelines.pipeline.eval_dataset`) and the counts are summed across processes at the end. Every
new image size compiles the step once (DDR's cameras give a few sizes). Process 0 also draws its first
`config.num_pictures` examples side by side (`picture`), one at a time as they come.
"""
import itertools
import sys

from absl import logging
import cv2
from flax import nnx
import grain
import jax
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import pipeline
from data_pipelines import prepare
from m2mrf_jax import checkpoints
from m2mrf_jax import inference
from m2mrf_jax import mesh as mesh_lib
from m2mrf_jax import metrics
from m2mrf_jax import report
from m2mrf_jax import summary
from m2mrf_jax import visualize


def make_eval_step(graphdef, edges, mesh: Mesh, tta: str = 'none'):
  """The jitted counting step: (total, state, images, masks, valid) -> (total, hist, logits).

  hist is the batch's per-image histograms (N, 2, C, T + 1) (`metrics.histogram`), logits are at the
  input size.

  Args:
    graphdef: the model's graph definition (eval mode).
    edges: (T,) float32 thresholds of the counts.
    mesh: a 1-D 'data' mesh; images (N, h', w', 3), masks (N, H, W) uint8 (`metrics.pack_masks`) and
      valid (N,) are split over it.
    tta: test-time augmentation, 'none' or 'flip' (`inference.logits`).
  """
  def step(total, state, images, masks, valid):
    logits = inference.logits(nnx.merge(graphdef, state), images, tta)
    total, hist = metrics.count_resized(total, logits, masks, valid, edges, 'data')
    return total, hist, logits

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P('data'), P('data'), P('data')),
                          out_specs=(P(), P('data'), P('data')), check_vma=False)
  return jax.jit(sharded, donate_argnums=0)


def same_size_batches(examples, batch_size: int):
  """Groups consecutive examples of one input and original size into lists of at most `batch_size`."""
  def key(example):
    return example['image'].shape, tuple(example['original_size'])

  for _, group in itertools.groupby(examples, key=key):
    group = iter(group)
    while batch := list(itertools.islice(group, batch_size)):
      yield batch


def _stack(batch, size):
  """(images, mask bits, valid) of `size` rows; missing rows repeat the last example and are not valid."""
  rows = batch + [batch[-1]] * (size - len(batch))
  images = np.stack([np.asarray(e['image'], np.float32) for e in rows])
  masks = np.stack([metrics.pack_masks(e['masks']) for e in rows])
  valid = np.arange(size) < len(batch)
  return images, masks, valid


def score(model: nnx.Module, examples: grain.MapDataset, config) -> dict:
  """Scores `model` on this process's `examples` with the official protocol, over all processes.

  Args:
    model: the segmentor; scored in eval mode (the caller's module is left as it is).
    examples: this process's `eval_example` dicts (`pipeline.eval_dataset`); may be empty.
    config: the full config (`model.num_classes`, `eval_batch_size`, `aupr_fine_thresholds`,
      `num_pictures`).

  Returns:
    The metrics dict of `metrics.scores` (`aupr`, `iou`, `f1`, `mAUPR`, `mIoU`, `mF1`, ...), with
    `num_images` and `per_image` (`metrics.PooledCounts.image_result`: ids and (N, C) scores), over
    all processes, and `pictures`: image id -> `picture` of the first `config.num_pictures` examples
    (process 0's; empty on the other processes).
  """
  mesh = mesh_lib.local_mesh()
  eval_model = nnx.clone(model)
  eval_model.eval()
  graphdef, state = nnx.split(eval_model)
  state = jax.device_put(jax.tree.map(local_copy, state), mesh_lib.replicated(mesh))

  counts = metrics.PooledCounts(config.model.num_classes, config.aupr_fine_thresholds, mesh=mesh)
  step = make_eval_step(graphdef, counts.edges, mesh, config.tta)
  rows = NamedSharding(mesh, P('data'))
  batch_size = config.eval_batch_size * mesh.size
  reader = examples.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size))
  num_images, pictures = 0, {}
  wanted = config.num_pictures if jax.process_index() == 0 else 0
  progress = tqdm.tqdm(total=len(examples), desc='evaluation', unit='image', file=sys.stderr,
                       disable=jax.process_index() != 0)
  for batch in same_size_batches(reader, batch_size):
    arrays = jax.device_put(_stack(batch, batch_size), rows)
    counts.total, hist, logits = step(counts.total, state, *arrays)
    counts.add_images(hist, arrays[2], [e['id'] for e in batch])
    if (take := min(wanted - len(pictures), len(batch))) > 0:
      for example, row in zip(batch, np.asarray(logits[:take])):
        pictures[example['id']] = picture(example, row, config.data)
    num_images += len(batch)
    progress.update(len(batch))
    logging.log_every_n_seconds(logging.INFO, 'evaluation: %d images', 30, num_images)
  progress.close()
  result = counts.result()
  result['per_image'] = counts.image_result()
  result['num_images'] = int(np.sum(_all_processes(num_images)))
  if not result['num_images']:
    raise ValueError('evaluation got no images')
  result['pictures'] = pictures
  logging.info('evaluated %d images', result['num_images'])
  return result


def picture(example, logits, data_config):
  """`visualize.picture` of one example: the prediction as counted (logits resized to the original size
  bilinearly, > 0: prob > 0.5), the image at the test scale; uint8.

  Args:
    example: an `eval_example` (normalised image at the test scale, masks at the original size).
    logits: (h, w, C) the model's logits for it at the test scale.
    data_config: `config.data` (mean, std to undo the normalisation).
  """
  image = example['image'] * np.asarray(data_config.std) + np.asarray(data_config.mean)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  height, width = example['original_size']
  predicted = cv2.resize(logits, (width, height), interpolation=cv2.INTER_LINEAR) > 0
  return visualize.picture(image, example['masks'], predicted.reshape(height, width, -1),
                           title=example['id'])


def local_copy(x):
  """This process's copy of a parameter replicated over a (possibly multi-process) mesh."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError(f'evaluation needs replicated parameters, got one sharded as {x.sharding}')
    return x.addressable_data(0)
  return x


def _all_processes(value):
  if jax.process_count() == 1:
    return np.array([value])
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(np.array(value))


def evaluate_checkpoint(config, workdir, checkpoint=''):
  """Scores a checkpoint (default: the latest in `workdir`) on `config.eval_split`; reports to `workdir`.

  Args:
    config: the config; `config.model` must match the checkpoint's, and the checkpoint's model card
      (printed) must not contradict it (`checkpoints.checked_card`).
    workdir: where metrics.json, the table, the plots and the logs go (and the data is prepared).
    checkpoint: an orbax checkpoint directory (e.g. written by `m2mrf_jax.convert`).

  Returns:
    The metrics dict.
  """
  directory = checkpoint or workdir
  checkpoints.checked_card(directory, config)
  model = checkpoints.restore_model(directory, config.model)
  step = checkpoints.read_meta(directory)['step']
  data_dir = prepare.prepare(config.data, workdir)
  scores = score(model, pipeline.eval_dataset(config.data, data_dir, config.eval_split), config)
  with summary.Writer(workdir) as writer:
    report.write(scores, workdir, writer, step)
    writer.write_scalars(step, report.scalars(scores))
  return scores
