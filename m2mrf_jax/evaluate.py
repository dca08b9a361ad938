"""Evaluation of a model over a dataset split, as the official test: table, metrics.json, PR curves.

Per image: the model (eval mode) at the test scale gives logits (1, h', w', 4), which are resized
bilinearly (align_corners=False, no antialiasing) to the original size, passed through the sigmoid, and
counted against the full-resolution masks band by band of rows (`metrics.count_resized`: the
full-resolution map never exists at once), all in one jitted step on device. A batch
holds images of one size, `config.eval_batch_size` per device, split over the devices of this process
(images are decoded in threads ahead of the device); each process evaluates its share of the split
(`data_pipelines.pipeline.eval_examples`) and the counts are summed across processes at the end. Every
new image size compiles the step once (DDR's cameras give a few sizes).
"""
import collections
import concurrent.futures
import itertools
import json

from absl import logging
from etils import epath
from flax import nnx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m2mrf_jax import metrics
from m2mrf_jax import visualize

METRICS_FILE = 'metrics.json'
PR_CURVES_FILE = 'pr_curves.png'


def local_mesh(mesh: Mesh | None = None) -> Mesh:
  """A 1-D 'data' mesh of this process's devices (of `mesh`, or all local devices)."""
  devices = jax.local_devices() if mesh is None else [d for d in mesh.devices.flat
                                                       if d.process_index == jax.process_index()]
  return Mesh(np.array(devices), ('data',))


def make_eval_step(graphdef, edges, mesh: Mesh):
  """The jitted counting step: (total, state, images, masks, valid) -> total.

  Args:
    graphdef: the model's graph definition (eval mode).
    edges: (T,) float32 thresholds of the counter.
    mesh: a 1-D 'data' mesh; images (N, h', w', 3), masks (N, H, W, C) and valid (N,) are split over it.
  """
  def step(total, state, images, masks, valid):
    logits = nnx.merge(graphdef, state)(images)
    return metrics.count_resized(total, logits, masks, valid, edges, 'data')

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P('data'), P('data'), P('data')),
                          out_specs=P(), check_vma=False)
  return jax.jit(sharded, donate_argnums=0)


def same_size_batches(examples, batch_size: int):
  """Groups consecutive examples of one input and original size into lists of at most `batch_size`."""
  def key(example):
    return example['image'].shape, tuple(example['original_size'])

  for _, group in itertools.groupby(examples, key=key):
    group = iter(group)
    while batch := list(itertools.islice(group, batch_size)):
      yield batch


def prefetch(sequence, depth: int):
  """Iterates over `sequence[i]`, decoding up to `depth` items ahead in threads."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(depth, 4)) as pool:
    pending = collections.deque()
    for i in range(len(sequence)):
      pending.append(pool.submit(sequence.__getitem__, i))
      if len(pending) > depth:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _stack(batch, size):
  """(images, masks, valid) of `size` rows; missing rows repeat the last example and are not valid."""
  rows = batch + [batch[-1]] * (size - len(batch))
  images = np.stack([np.asarray(e['image'], np.float32) for e in rows])
  masks = np.stack([np.asarray(e['masks'], bool) for e in rows])
  valid = np.arange(size) < len(batch)
  return images, masks, valid


def evaluate_model(model: nnx.Module, config, data_dir, *, mesh: Mesh | None = None) -> dict:
  """Scores `model` on `config.eval_split` with the official protocol.

  Args:
    model: the segmentor; evaluated in eval mode (the caller's module is left as it is).
    config: the full config (`data`, `model.num_classes`, `eval_split`, `eval_batch_size`,
      `aupr_fine_thresholds`).
    data_dir: the TFDS data directory holding the built dataset.
    mesh: the training mesh; this process evaluates on its devices. None: all local devices.

  Returns:
    The metrics dict of `metrics.scores` (`aupr`, `iou`, `f1`, `mAUPR`, `mIoU`, `mF1`, ...), with
    `num_images` (over all processes).
  """
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top (data and model load lazily)
  mesh = local_mesh(mesh)
  graphdef, state = nnx.split(model)
  eval_model = nnx.merge(graphdef, state)
  eval_model.eval()
  graphdef, state = nnx.split(eval_model)
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(jax.tree.map(_local_copy, state), replicated)

  counter = metrics.Counter(config.model.num_classes, config.aupr_fine_thresholds, mesh=mesh)
  step = make_eval_step(graphdef, counter.edges, mesh)
  rows = NamedSharding(mesh, P('data'))
  batch_size = config.eval_batch_size * mesh.size
  split = config.eval_split
  examples = pipeline.eval_examples(config.data, data_dir, split)  # this process's share
  num_images = 0
  for batch in same_size_batches(prefetch(examples, 2 * batch_size), batch_size):
    arrays = jax.device_put(_stack(batch, batch_size), rows)
    counter.total = step(counter.total, state, *arrays)
    num_images += len(batch)
    logging.log_every_n_seconds(logging.INFO, 'evaluation on %s: %d images', 30, split, num_images)
  result = counter.result()
  result['num_images'] = int(np.sum(_all_processes(num_images)))
  if not result['num_images']:
    raise ValueError(f'no images in split {split!r} of {config.data.name} in {data_dir}')
  logging.info('evaluated %d images of %s/%s', result['num_images'], config.data.name, split)
  return result


def _local_copy(x):
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


def format_table(scores: dict) -> str:
  """The paper's layout: AUPR, F and IoU per class and their mean, in percent (+ the fine AUPR)."""
  names = list(metrics.CLASSES) + ['mean']
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
    out[key] = dict(zip(metrics.CLASSES, np.asarray(scores[key]).tolist()))
  out['curve'] = {'thresholds': scores['thresholds'].tolist(),
                  'precision': dict(zip(metrics.CLASSES, scores['precision'].T.tolist())),
                  'recall': dict(zip(metrics.CLASSES, scores['recall'].T.tolist()))}
  if 'num_images' in scores:
    out['num_images'] = scores['num_images']
  return out


def report(scores: dict, workdir) -> None:
  """Prints the table and writes metrics.json and pr_curves.png into `workdir` (process 0 only)."""
  if jax.process_index() != 0:
    return
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  table = format_table(scores)
  print(table, flush=True)
  (workdir / METRICS_FILE).write_text(json.dumps(to_json(scores), indent=1))
  visualize.plot_pr_curves(scores, workdir / PR_CURVES_FILE)
  logging.info('wrote %s and %s in %s', METRICS_FILE, PR_CURVES_FILE, workdir)
