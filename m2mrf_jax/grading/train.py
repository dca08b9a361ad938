"""The DR grading job: `train_and_evaluate(config, workdir)` and `evaluate_checkpoint` for SiAN.

The same machinery as the segmentation job (m2mrf_jax.train): a 1-D 'data' mesh over every device,
parameters replicated and the global batch sharded, one jitted step, orbax checkpoints that resume
exactly (data iterator included), log.jsonl + TensorBoard. Loss: softmax cross-entropy on the grade.
Only the main branch and the attention block are optimised unless `model.freeze_side` is False.
"""
import importlib.util
import json
import math
import time

from absl import logging
from etils import epath
from flax import nnx
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

from configs import grading_common
from data_pipelines import grading_pipeline
from m2mrf_jax import checkpoints
from m2mrf_jax import convert as seg_convert
from m2mrf_jax import evaluate as seg_evaluate
from m2mrf_jax import losses
from m2mrf_jax import summary
from m2mrf_jax import train as seg_train
from m2mrf_jax.grading import convert
from m2mrf_jax.grading import metrics
from m2mrf_jax.grading import sian

METRICS_FILE = 'metrics.json'
# Model config keys that change the parameter tree (the side branch's are checked as well).
STRUCTURE_KEYS = ('num_classes', 'attention', 'attention_channels')


def reference_config(argv):
  """The grading reference config if `--config=FILE` in `argv` is a grading config, else None.

  main.py checks `--config.KEY` overrides against it (the segmentation keys otherwise).
  """
  paths = [a.split('=', 1)[1].split(':')[0] for a in argv if a.startswith('--config=')]
  if not paths or not paths[-1].endswith('.py') or not epath.Path(paths[-1]).exists():
    return None
  spec = importlib.util.spec_from_file_location('_grading_probe', paths[-1])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  return config if config.get('task') == 'grading' else None


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


def make_train_step(graphdef, trainable, schedule, mesh):
  """The jitted step (state, batch) -> (state, {'loss', 'accuracy', 'lr'}); `state` is donated.

  Args:
    graphdef: the graph definition of the pair (model, optimizer).
    trainable: the nnx filter of the optimised parameters (`sian.trainable`).
    schedule: step -> learning rate (for logging).
    mesh: the device mesh; the batch is sharded over 'data'.
  """
  replicated = NamedSharding(mesh, P())

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, trainable, ...)

    def loss_of(params, rest):
      model = nnx.merge(model_def, params, rest, copy=True)
      logits, _ = model(batch['image'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['grade']).mean()
      return loss, (nnx.state(model, nnx.Not(trainable)), logits)

    (loss, (rest, logits)), grads = jax.value_and_grad(loss_of, has_aux=True)(params, rest)
    nnx.update(model, rest)
    lr = schedule(optimizer.step[...])
    optimizer.update(model, grads)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['grade'])
    new_state = jax.lax.with_sharding_constraint(nnx.state((model, optimizer)), replicated)
    return new_state, {'loss': loss, 'accuracy': accuracy, 'lr': lr}

  return jax.jit(step, donate_argnums=0)


def predict_split(model, config, data_dir, split, mesh=None):
  """(grades (N,), probabilities (N, K)) of `split`, over every process, in the split's order."""
  mesh = seg_evaluate.local_mesh(mesh)
  graphdef, state = nnx.split(model)
  eval_model = nnx.merge(graphdef, state)
  eval_model.eval()
  graphdef, state = nnx.split(eval_model)
  state = jax.device_put(jax.tree.map(seg_evaluate._local_copy, state),  # pylint: disable=protected-access
                         NamedSharding(mesh, P()))
  forward = jax.jit(lambda s, x: jax.nn.softmax(nnx.merge(graphdef, s)(x)[0]))
  rows = NamedSharding(mesh, P('data'))
  batch_size = config.eval_batch_size * mesh.size
  examples = grading_pipeline.EvalExamples(config.data, data_dir, split)
  grades, probs = [], []
  batch = []
  for i, example in enumerate(seg_evaluate.prefetch(examples, 2 * batch_size)):
    batch.append(example)
    if len(batch) == batch_size or i == len(examples) - 1:
      images = np.stack([e['image'] for e in batch] + [batch[-1]['image']] * (batch_size - len(batch)))
      out = np.asarray(forward(state, jax.device_put(images, rows)))[:len(batch)]
      grades += [e['grade'] for e in batch]
      probs.append(out)
      batch = []
  grades = np.asarray(grades, np.int64)
  probs = np.concatenate(probs) if probs else np.zeros((0, config.model.num_classes), np.float32)
  if jax.process_count() > 1:  # examples p, p + count, ... of each process, back in split order
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    size = -(-examples.split_size // jax.process_count())
    pad = size - len(grades)
    all_grades = multihost_utils.process_allgather(np.pad(grades, (0, pad), constant_values=-1))
    all_probs = multihost_utils.process_allgather(np.pad(probs, ((0, pad), (0, 0))))
    keep = all_grades.T.reshape(-1) >= 0
    grades = all_grades.T.reshape(-1)[keep]
    probs = all_probs.transpose(1, 0, 2).reshape(-1, probs.shape[1])[keep]
  if not len(grades):
    raise ValueError(f'no images in split {split!r} of {config.data.name} in {data_dir}')
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


def evaluate_model(model, config, data_dir, split, mesh=None, workdir=None):
  """Scores `model` on `split`; with `workdir` (process 0) prints the table and writes metrics.json."""
  grades, probs = predict_split(model, config, data_dir, split, mesh)
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
  """Raises ValueError for an unknown key, a batch the devices cannot share, or a wrong class count."""
  if config.data.name not in grading_common.DATASETS:
    raise ValueError(f'config.data.name must be one of {tuple(grading_common.DATASETS)}, got '
                     f'{config.data.name!r}')
  seg_train.validate_config(config, grading_common.get_config(config.data.name))
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of the '
                     f'{jax.device_count()} devices')
  expected = 6 if config.data.keep_ungradable else 5
  if config.model.num_classes != expected:
    raise ValueError(f'config.model.num_classes={config.model.num_classes} but the data has {expected} '
                     f'grades (data.keep_ungradable={config.data.keep_ungradable})')


def train_and_evaluate(config, workdir):
  """Trains SiAN in `workdir` (resuming from its latest checkpoint), then evaluates on the test split.

  Returns:
    The test metrics (dict with 'accuracy', 'kappa', ...), or None when preempted.
  """
  check_config(config)

  # ---- Devices and data -------------------------------------------------------------------
  mesh = seg_train.make_mesh()
  data_dir = grading_pipeline.prepare(config.data, workdir)
  train_iter = None
  if config.num_train_steps > 0:
    train_iter = grading_pipeline.train_iterator(config.data, data_dir, batch_size=config.batch_size,
                                                 seed=config.seed)

  # ---- Model, optimizer, resume -----------------------------------------------------------
  model = sian.build(config.model, nnx.Rngs(config.seed))
  trainable = sian.trainable(config.model)
  optimizer = nnx.Optimizer(model, losses.sgd(config), wrt=trainable)
  ckpt = checkpoints.TrainCheckpointer(workdir, config, best_metric='kappa')
  writer = summary.SummaryWriter(workdir)
  try:
    if ckpt.latest_step() is None:
      load_pretrained(config, model)
    else:
      check_model_config(workdir, checkpoints.read_meta(workdir)['model'], config.model)
    model.train()
    state = jax.device_put(nnx.state((model, optimizer)), NamedSharding(mesh, P()))
    nnx.update((model, optimizer), state)
    step = ckpt.restore(model, optimizer, train_iter)
    if step:
      logging.info('Resumed from step %d of %s.', step, workdir)
    saved_step = step if ckpt.latest_step() is not None else None

    # ---- Training loop --------------------------------------------------------------------
    graphdef, state = nnx.split((model, optimizer))
    train_step = make_train_step(graphdef, trainable, losses.poly_schedule(config), mesh)
    num_steps, first_step, window = config.num_train_steps, step, []
    while step < num_steps:
      state, out = train_step(state, seg_train.global_batch(mesh, next(train_iter)))
      step += 1
      loss = float(out['loss'])
      if not math.isfinite(loss):
        raise FloatingPointError(f'loss is {loss} at step {step}; the last good checkpoint (step '
                                 f'{ckpt.latest_step()}) in {workdir} is intact.')
      window.append((loss, float(out['accuracy'])))
      if step == first_step + 1:  # the first step includes compilation
        window_start, window_step = time.time(), step
      if step % config.log_every_steps == 0 or step == num_steps:
        scalars = {'loss': np.mean([w[0] for w in window]),
                   'train_accuracy': np.mean([w[1] for w in window]), 'lr': float(out['lr'])}
        speed = ''
        if step > window_step:
          per_sec = (step - window_step) / (time.time() - window_start)
          scalars['images_per_sec'] = per_sec * config.batch_size
          eta = time.strftime('%H:%M:%S', time.gmtime((num_steps - step) / per_sec))
          speed = f'  {scalars["images_per_sec"]:.2f} images/s  ETA {eta}'
        writer.scalars(step, scalars)
        logging.info('step %d/%d  loss %.4f  train accuracy %.3f  lr %.3g%s', step, num_steps,
                     scalars['loss'], scalars['train_accuracy'], scalars['lr'], speed)
        window_start, window_step, window = time.time(), step, []
      validate = config.val_split and step % config.eval_every_steps == 0 and step < num_steps
      preempted = ckpt.preempted(step)
      if validate or preempted or (step % config.checkpoint_every_steps == 0 and step < num_steps):
        nnx.update((model, optimizer), state)
        scores = None
        if validate:
          scores = evaluate_model(model, config, data_dir, config.val_split, mesh)
          writer.scalars(step, _scalars(scores, 'val'))
          logging.info('step %d validation: accuracy %.4f  kappa %.4f', step, scores['accuracy'],
                       scores['kappa'])
        ckpt.save(step, model, optimizer, train_iter, metrics=scores and {'kappa': scores['kappa']})
        saved_step = step
      if preempted:
        logging.warning('Preempted: saved step %d in %s; run again to resume.', step, workdir)
        return None
    nnx.update((model, optimizer), state)

    # ---- Evaluation and the final checkpoint ----------------------------------------------
    scores = None
    try:
      scores = evaluate_model(model, config, data_dir, config.eval_split, mesh, workdir)
      writer.scalars(step, _scalars(scores, config.eval_split))
    finally:
      if step > 0 and saved_step != step:
        ckpt.save(step, model, optimizer, train_iter)
    return scores
  finally:
    ckpt.close()
    writer.close()


def evaluate_checkpoint(config, workdir, checkpoint=''):
  """Evaluates a grading checkpoint (default: the latest in `workdir`) on `config.eval_split`."""
  check_config(config)
  mesh = seg_train.make_mesh()
  model = restore(checkpoint or workdir, config.model, sharding=NamedSharding(mesh, P()))
  data_dir = grading_pipeline.prepare(config.data, workdir)
  return evaluate_model(model, config, data_dir, config.eval_split, mesh, workdir)
