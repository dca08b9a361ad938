"""The DR grading job: `train(config, workdir, train_data, evaluate_fn)`, `train_and_evaluate` and
`evaluate_checkpoint` for SiAN.

The segmentation job's machinery (m2mrf_jax.train): a 1-D 'data' mesh over every device, parameters
replicated and the global batch sharded, one jitted step, losses summed on device and read at log and
save steps, orbax checkpoints (global batch k is a function of (seed, k), so resuming needs only the
step), log.jsonl + TensorBoard. Loss: softmax cross-entropy on the grade. Only the main branch and the
attention block are optimised unless `model.freeze_side` is False.
"""
import functools
import json
import math

from absl import logging
from etils import epath
from flax import nnx
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from configs import grading_common
from data_pipelines import grading_pipeline
from m2mrf_jax import checkpoints
from m2mrf_jax import chrono as chrono_lib
from m2mrf_jax import convert as seg_convert
from m2mrf_jax import distributed
from m2mrf_jax import evaluate as seg_evaluate
from m2mrf_jax import losses
from m2mrf_jax import mesh as mesh_lib
from m2mrf_jax import summary
from m2mrf_jax import train as seg_train
from m2mrf_jax.grading import convert
from m2mrf_jax.grading import metrics
from m2mrf_jax.grading import sian

METRICS_FILE = 'metrics.json'
# Model config keys that change the parameter tree (the side branch's are checked as well).
STRUCTURE_KEYS = ('num_classes', 'attention', 'attention_channels')

def check_model_config(directory, saved, wanted):
  """Raises ValueError when a checkpoint holds another grading model than `wanted`."""
  wanted = wanted.to_dict() if hasattr(wanted, 'to_dict') else dict(wanted)
  diffs = [k for k in STRUCTURE_KEYS if saved.get(k) != wanted.get(k)]
  diffs += [f'side.{k}' for k in checkpoints.STRUCTURE_KEYS
            if saved.get('side', {}).get(k) != wanted['side'].get(k)]
  if diffs:
    raise ValueError(f'checkpoint at {directory} holds another grading model: ' + ', '.join(
        f'{k} (checkpoint {_get(saved, k)!r}, config {_get(wanted, k)!r})' for k in diffs))


def _get(tree, dotted):
  for key in dotted.split('.'):
    tree = tree.get(key, {}) if isinstance(tree, dict) else None
  return tree


def restore(directory, model_config, sharding=None):
  """The SiAN of a grading checkpoint (training workdir or `checkpoints.save_model`)."""
  check_model_config(directory, checkpoints.read_meta(directory)['model'], model_config)
  return checkpoints.restore_model(directory, model_config, sharding=sharding, build=sian.build)


def load_pretrained(config, model):
  """ImageNet Inception-v3 into the main branch; the trained segmenter into the side branch."""
  if config.main_pretrained:
    convert.load_imagenet(model.main, config.main_pretrained)
  else:
    logging.warning('config.main_pretrained is empty: the main branch starts from scratch (the paper '
                    'starts from ImageNet: torchvision inception_v3_google-0cc3c7bd.pth).')
  if model.side is None:
    return
  if config.side_checkpoint and config.side_pretrained:
    raise ValueError('set config.side_checkpoint or config.side_pretrained, not both')
  if config.side_checkpoint:
    segmenter = checkpoints.restore_model(config.side_checkpoint, config.model.side)
    nnx.update(model.side, nnx.state(segmenter))
    logging.info('Side branch: the segmenter of %s.', config.side_checkpoint)
  elif config.side_pretrained:
    seg_convert.load_state_dict(model.side, seg_convert.read_pth(config.side_pretrained))
    logging.info('Side branch: the segmenter of %s.', config.side_pretrained)
  else:
    logging.warning('No config.side_checkpoint: the side branch is an untrained segmenter%s.',
                    ' (frozen)' if config.model.freeze_side else '')


def make_train_step(graphdef, trainable, mesh):
  """The jitted step (state, batch) -> (state, (loss, accuracy)); `state` is donated.

  Args:
    graphdef: the graph definition of the pair (model, optimizer).
    trainable: the nnx filter of the optimised parameters (`sian.trainable`).
    mesh: the device mesh; the state stays replicated on it.
  """
  replicated = mesh_lib.replicated(mesh)

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(replicated, replicated))
  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_of(model):
      logits, _ = model(batch['image'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['grade']).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == batch['grade'])

    # BN statistics are updated in `model`; only `trainable` parameters are differentiated.
    (loss, accuracy), grads = nnx.value_and_grad(
        loss_of, argnums=nnx.DiffState(0, trainable), has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), (loss, accuracy)

  return train_step


def predict_split(model, config, data_dir, split):
  """(grades (N,), probabilities (N, K)) of `split`, over every process, in the split's order."""
  mesh = mesh_lib.local_mesh()
  eval_model = nnx.clone(model)
  eval_model.eval()
  graphdef, state = nnx.split(eval_model)
  state = jax.device_put(jax.tree.map(seg_evaluate.local_copy, state), mesh_lib.replicated(mesh))
  forward = jax.jit(lambda s, x: jax.nn.softmax(nnx.merge(graphdef, s)(x)[0]))
  rows = mesh_lib.data_sharding(mesh)
  batch_size = config.eval_batch_size * mesh.size
  examples = grading_pipeline.eval_dataset(config.data, data_dir, split)
  reader = examples.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size))
  grades, probs, batch = [], [], []
  for i, example in enumerate(reader):
    batch.append(example)
    if len(batch) == batch_size or i == len(examples) - 1:
      images = np.stack([e['image'] for e in batch] + [batch[-1]['image']] * (batch_size - len(batch)))
      probs.append(np.asarray(forward(state, jax.device_put(images, rows)))[:len(batch)])
      grades += [e['grade'] for e in batch]
      batch = []
  grades = np.asarray(grades, np.int64)
  probs = np.concatenate(probs) if probs else np.zeros((0, config.model.num_classes), np.float32)
  if jax.process_count() > 1:  # examples p, p + count, ... of each process, back in split order
    size = int(np.max(multihost_utils.process_allgather(np.array(len(grades)))))
    pad = size - len(grades)
    all_grades = multihost_utils.process_allgather(np.pad(grades, (0, pad), constant_values=-1))
    all_probs = multihost_utils.process_allgather(np.pad(probs, ((0, pad), (0, 0))))
    keep = all_grades.T.reshape(-1) >= 0
    grades = all_grades.T.reshape(-1)[keep]
    probs = all_probs.transpose(1, 0, 2).reshape(-1, probs.shape[1])[keep]
  return grades, probs


def format_report(scores, names):
  """The metrics as a table: overall figures, F1 per grade, the confusion matrix."""
  lines = [f'accuracy {100 * scores["accuracy"]:.2f}%   quadratic kappa {scores["kappa"]:.4f}   '
           f'macro F1 {100 * scores["macro_f1"]:.2f}%   referable-DR AUC '
           f'{scores["referable_auc"]:.4f}   ({scores["num_images"]} images)']
  width = max(len(n) for n in names) + 2
  lines.append('F1 per grade: ' + '  '.join(f'{n} {100 * f:.1f}' for n, f in zip(names, scores['f1'])))
  lines.append('confusion (rows true, columns predicted):')
  lines.append(' ' * width + ''.join(f'{i:>7}' for i in range(len(names))))
  for i, (name, row) in enumerate(zip(names, scores['confusion'])):
    lines.append(f'{f"{i} {name}":<{width}}' + ''.join(f'{v:>7}' for v in row))
  return '\n'.join(lines)


def _json_safe(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value


def evaluate_model(model, config, data_dir, split, workdir=None):
  """Scores `model` on `split`; with `workdir` (process 0) prints the table and writes metrics.json."""
  grades, probs = predict_split(model, config, data_dir, split)
  scores = metrics.scores(grades, probs)
  scores['split'] = split
  if workdir is not None and jax.process_index() == 0:
    names = (metrics.GRADES + (metrics.UNGRADABLE,))[:config.model.num_classes]
    print(format_report(scores, names), flush=True)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / METRICS_FILE).write_text(json.dumps(_json_safe(scores), indent=1))
    logging.info('wrote %s in %s', METRICS_FILE, workdir)
  return scores


def _scalars(scores, prefix):
  return {f'{prefix}/{k}': v for k, v in scores.items()
          if isinstance(v, float) and math.isfinite(v)}


def check_config(config):
  """Raises ValueError for an unknown dataset, a batch the devices cannot share, or a wrong class count."""
  if config.data.name not in grading_common.DATASETS:
    raise ValueError(f'config.data.name must be one of {tuple(grading_common.DATASETS)}, got '
                     f'{config.data.name!r}')
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of the '
                     f'{jax.device_count()} devices (of {jax.process_count()} processes)')
  expected = 6 if config.data.keep_ungradable else 5
  if config.model.num_classes != expected:
    raise ValueError(f'config.model.num_classes={config.model.num_classes} but the data has {expected} '
                     f'grades (data.keep_ungradable={config.data.keep_ungradable})')


def create_model_and_optimizer(config, mesh):
  """The freshly built SiAN of `config.model` and its optimizer (of `sian.trainable`), replicated."""
  model = sian.build(config.model, nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, losses.sgd(config), wrt=sian.trainable(config.model))
  nnx.update((model, optimizer),
             jax.device_put(nnx.state((model, optimizer)), mesh_lib.replicated(mesh)))
  return model, optimizer


def train(config, workdir, train_data, evaluate_fn):
  """Trains SiAN in `workdir` (resuming from its latest checkpoint), then evaluates.

  Args:
    config: a config as `configs/grading_common.py` describes it.
    workdir: holds the orbax checkpoints, config.json, log.jsonl and TensorBoard events.
    train_data: (start_step=, rows=) -> an iterator of this process's `rows` of global batches
      start_step, start_step + 1, ... {'image', 'grade'}; each global batch is a function of
      (seed, step) alone (`grading_pipeline.train_iterator`).
    evaluate_fn: (model, split, workdir or None) -> scores dict with 'accuracy', 'kappa', ...; with
      a workdir, the report is written there.

  Returns:
    The metrics of `config.eval_split`, or None when preempted.
  """
  check_config(config)
  num_steps = config.num_train_steps

  # ---- Devices, config.json, model and optimizer ----------------------------------------
  mesh = mesh_lib.make_mesh()
  logging.info('%d devices over %d processes; global batch %d.', jax.device_count(),
               jax.process_count(), config.batch_size)
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / seg_train.CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
  model, optimizer = create_model_and_optimizer(config, mesh)

  with (summary.Writer(workdir) as writer,
        checkpoints.TrainCheckpointer(workdir, config, best_metric='kappa') as ckpt):
    # ---- Resume, or start from the pretrained branches ----------------------------------
    if ckpt.latest_step() is None:
      load_pretrained(config, model)
    else:
      check_model_config(workdir, checkpoints.read_meta(workdir)['model'], config.model)
    model.train()
    step = ckpt.restore(model, optimizer)
    if step:
      logging.info('Resumed from step %d of %s.', step, workdir)
    if step < num_steps:  # global batch k is a function of (seed, k) alone: the step resumes it
      rows = distributed.process_rows(mesh_lib.data_sharding(mesh), config.batch_size)
      feed = mesh_lib.prefetch(train_data(start_step=step, rows=rows),  # two batches ahead
                               functools.partial(mesh_lib.global_batch, mesh))

    # ---- Training loop: losses summed on device, read (and checked) at log and save steps --
    graphdef, state = nnx.split((model, optimizer))
    train_step = make_train_step(graphdef, sian.trainable(config.model), mesh)
    schedule = losses.poly_schedule(config)
    chrono = chrono_lib.Chrono(num_steps)
    loss_sum, accuracy_sum, window_start = 0.0, 0.0, step + 1
    while step < num_steps:
      state, (loss, accuracy) = train_step(state, next(feed))
      loss_sum, accuracy_sum = loss_sum + loss, accuracy_sum + accuracy
      step += 1
      chrono.step_done(step)
      log = step % config.log_every_steps == 0 or step == num_steps
      validate = bool(config.val_split) and step % config.eval_every_steps == 0 and step < num_steps
      preempted = ckpt.preempted(step)
      save = validate or preempted or (step % config.checkpoint_every_steps == 0 and step < num_steps)
      if log or save:
        total = seg_train.check_finite(loss_sum, window_start, step, ckpt, workdir)
      if log:
        steps = step - window_start + 1
        scalars = {'loss': total / steps, 'train_accuracy': float(accuracy_sum) / steps,
                   'lr': float(schedule(step - 1))}
        steps_per_sec, eta = chrono.measure(step)
        speed = ''
        if steps_per_sec is not None:
          scalars['images_per_sec'] = steps_per_sec * config.batch_size
          speed = f'  {scalars["images_per_sec"]:.2f} images/s  ETA {chrono_lib.hms(eta)}'
        writer.write_scalars(step, scalars)
        logging.info('step %d/%d  loss %.4f  train accuracy %.3f  lr %.3g%s', step, num_steps,
                     scalars['loss'], scalars['train_accuracy'], scalars['lr'], speed)
        loss_sum, accuracy_sum, window_start = 0.0, 0.0, step + 1
      if save:
        with chrono.paused():
          nnx.update((model, optimizer), state)
          scores = None
          if validate:
            scores = evaluate_fn(model, config.val_split, None)
            writer.write_scalars(step, _scalars(scores, 'val'))
            logging.info('step %d validation: accuracy %.4f  kappa %.4f', step, scores['accuracy'],
                         scores['kappa'])
          ckpt.save(step, model, optimizer, metrics=scores and {'kappa': scores['kappa']})
      if preempted:
        logging.warning('Preempted: saved step %d in %s; run again to resume.', step, workdir)
        return None
    nnx.update((model, optimizer), state)

    # ---- Evaluation, then the final checkpoint (saved even if evaluation fails) ----------
    scores = None
    try:
      scores = evaluate_fn(model, config.eval_split, workdir)
      writer.write_scalars(step, _scalars(scores, config.eval_split))
    finally:
      if step > 0 and ckpt.latest_step() != step:
        ckpt.save(step, model, optimizer)
    return scores


def train_and_evaluate(config, workdir):
  """`train` with the real data: the grading dataset prepared (built on first use), its train
  iterator, and the evaluation (table and metrics.json) of `config.eval_split`."""
  check_config(config)  # before anything is prepared or written
  data_dir = grading_pipeline.prepare(config.data, workdir)
  train_data = functools.partial(grading_pipeline.train_iterator, config.data, data_dir,
                                 batch_size=config.batch_size, seed=config.seed)

  def evaluate_fn(model, split, report_dir):
    return evaluate_model(model, config, data_dir, split, report_dir)

  return train(config, workdir, train_data, evaluate_fn)


def evaluate_checkpoint(config, workdir, checkpoint=''):
  """Evaluates a grading checkpoint (default: the latest in `workdir`) on `config.eval_split`."""
  check_config(config)
  checkpoints.checked_card(checkpoint or workdir, config)  # printed; refused if it contradicts config
  model = restore(checkpoint or workdir, config.model)
  data_dir = grading_pipeline.prepare(config.data, workdir)
  return evaluate_model(model, config, data_dir, config.eval_split, workdir)
