"""The training job: `train_and_evaluate(config, workdir)` and `evaluate_checkpoint`.

Data parallel with `jax.jit` over a 1-D device mesh ('data'): parameters, BN statistics and
optimizer state replicated, the global batch sharded over every device of every process. BatchNorm
inside the jitted step reduces over the global batch (SyncBN, as the official 4-GPU runs).
"""
import math
import time

from absl import logging
from flax import nnx
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
import data_pipelines
from data_pipelines import pipeline
from m2mrf_jax import checkpoints
from m2mrf_jax import convert
from m2mrf_jax import distributed
from m2mrf_jax import evaluate
from m2mrf_jax import losses
from m2mrf_jax import models
from m2mrf_jax import summary


def validate_config(config, reference=None, prefix='config'):
  """Raises ValueError naming an unknown key and listing the valid ones (configs/common.py)."""
  reference = common.get_config() if reference is None else reference
  for key, value in config.items():
    if key not in reference:
      raise ValueError(f'unknown config key {prefix}.{key}; valid keys of {prefix}: '
                       f'{", ".join(sorted(reference.keys()))}')
    if isinstance(value, ml_collections.ConfigDict):
      validate_config(value, reference[key], f'{prefix}.{key}')


def check_overrides(argv, reference=None):
  """Raises ValueError for a `--config.KEY=...` whose KEY is not in configs/common.py."""
  reference = common.get_config() if reference is None else reference
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    node, prefix = reference, 'config'
    for key in arg[len('--config.'):].split('=', 1)[0].split('.'):
      if not hasattr(node, 'keys') or key not in node:
        valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(none: a value)'
        raise ValueError(f'unknown config key {prefix}.{key} in {arg!r}; valid keys of '
                             f'{prefix}: {valid}')
      node, prefix = node[key], f'{prefix}.{key}'


def make_mesh():
  """A 1-D mesh over every device of every process, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(mesh, local_batch):
  """Per-process NumPy batch {'image', 'label'} -> global arrays sharded over 'data'."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def make_train_step(graphdef, loss_fn, schedule, accum_steps, mesh):
  """Returns the jitted step (state, batch) -> (state, {'loss', 'lr'}); `state` is donated.

  Args:
    graphdef: the graph definition of the pair (model, optimizer).
    loss_fn: (logits, labels) -> scalar.
    schedule: optax schedule, step -> learning rate (for logging).
    accum_steps: micro-batches per update; gradients (and losses) are averaged over them and
      BN statistics are updated once per micro-batch, in order.
    mesh: the device mesh.
  """
  replicated = NamedSharding(mesh, P())

  def micro_batches(x):
    # (B, ...) -> (accum, B / accum, ...); micro-batch i takes rows i, i + accum, ... so every
    # device keeps its own rows.
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, 'data')))

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(params, rest, images, labels):
      model = nnx.merge(model_def, params, rest, copy=True)  # fresh Variables at this trace level
      loss = loss_fn(model(images), labels.astype(jnp.float32))
      return loss, nnx.state(model, nnx.Not(nnx.Param))

    def accumulate(carry, xs):
      grads, loss, rest = carry
      (micro_loss, rest), micro_grads = jax.value_and_grad(loss_of, has_aux=True)(params, rest, *xs)
      return (jax.tree.map(jnp.add, grads, micro_grads), loss + micro_loss, rest), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (micro_batches(batch['image']), micro_batches(batch['label']))
    (grads, loss, rest), _ = jax.lax.scan(accumulate, (zeros, 0.0, rest), xs)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    nnx.update(model, rest)
    lr = schedule(optimizer.step[...])
    optimizer.update(model, grads)
    new_state = jax.lax.with_sharding_constraint(nnx.state((model, optimizer)), replicated)
    return new_state, {'loss': loss / accum_steps, 'lr': lr}

  return jax.jit(step, donate_argnums=0)


def create_model_and_optimizer(config, mesh):
  """Builds the model (and loads `config.pretrained`) and its optimizer, replicated on `mesh`."""
  model = models.build(config.model, nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, losses.sgd(config), wrt=nnx.Param)
  state = jax.device_put(nnx.state((model, optimizer)), NamedSharding(mesh, P()))
  nnx.update((model, optimizer), state)
  return model, optimizer


def load_pretrained(config, model):
  """Loads the ImageNet backbone of `config.pretrained` into `model`; warns when there is none."""
  if not config.pretrained:
    logging.warning('config.pretrained is empty: training from scratch (the official runs '
                    'start from the ImageNet HRNet-W48, see README).')
    return
  skipped = convert.load_pretrained_backbone(model, convert.read_pth(config.pretrained))
  logging.info('Loaded %s into the backbone; %d tensors skipped (shape mismatch or absent).',
               config.pretrained, len(skipped))


def _check_batch(config):
  devices, accum = jax.device_count(), config.grad_accum_steps
  if config.batch_size % (accum * devices):
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of '
                     f'config.grad_accum_steps={accum} x {devices} devices (of '
                     f'{jax.process_count()} processes)')


def _evaluate(model, config, data_dir, mesh, workdir, step, writer):
  model.eval()
  metrics = evaluate.evaluate_model(model, config, data_dir, mesh=mesh)
  if jax.process_index() == 0:
    evaluate.report(metrics, workdir)
  writer.scalars(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
  model.train()
  return metrics


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming from its latest checkpoint), then evaluates.

  Args:
    config: a config as `configs/common.py` describes it.
    workdir: holds the orbax checkpoints, log.jsonl, TensorBoard events and metrics.json.

  Returns:
    The evaluation metrics (dict with 'mAUPR', 'mIoU', 'mF1', ...), or None when preempted.
  """
  validate_config(config)
  _check_batch(config)

  # ---- Devices and data -------------------------------------------------------------------
  mesh = make_mesh()
  logging.info('%d devices over %d processes; global batch %d (%d per micro-step).',
               jax.device_count(), jax.process_count(), config.batch_size,
               config.batch_size // config.grad_accum_steps)
  data_dir = data_pipelines.prepare(config.data, workdir)

  # ---- Model, optimizer, resume -----------------------------------------------------------
  model, optimizer = create_model_and_optimizer(config, mesh)
  ckpt = checkpoints.TrainCheckpointer(workdir, config)
  writer = summary.SummaryWriter(workdir)
  try:
    if ckpt.latest_step() is None:
      load_pretrained(config, model)
    step = ckpt.restore(model, optimizer)
    if step:
      logging.info('Resumed from step %d of %s.', step, workdir)
    saved_step = step if ckpt.latest_step() is not None else None
    if step < config.num_train_steps:  # global batch k is a function of (seed, k) only
      rows = distributed.process_rows(NamedSharding(mesh, P('data')), config.batch_size)
      train_iter = pipeline.train_iterator(config.data, data_dir, batch_size=config.batch_size,
                                           seed=config.seed, start_step=step, rows=rows)

    # ---- Training loop --------------------------------------------------------------------
    graphdef, state = nnx.split((model, optimizer))
    train_step = make_train_step(graphdef, losses.get_loss_fn(config), losses.poly_schedule(config),
                                 config.grad_accum_steps, mesh)
    num_steps = config.num_train_steps
    first_step, window_loss = step, []
    while step < num_steps:
      state, metrics = train_step(state, global_batch(mesh, next(train_iter)))
      step += 1
      loss = float(metrics['loss'])
      if not math.isfinite(loss):
        raise FloatingPointError(
            f'loss is {loss} at step {step}: training stopped without saving this state; the last '
            f'good checkpoint (step {ckpt.latest_step()}) in {workdir} is intact.')
      window_loss.append(loss)
      if step == first_step + 1:  # the first step includes compilation: time from its end.
        window_start, window_step = time.time(), step
      if step % config.log_every_steps == 0 or step == num_steps:
        scalars = {'loss': np.mean(window_loss), 'lr': float(metrics['lr'])}
        speed = ''
        if step > window_step:
          steps_per_sec = (step - window_step) / (time.time() - window_start)
          scalars['images_per_sec'] = steps_per_sec * config.batch_size
          eta = time.strftime('%H:%M:%S', time.gmtime((num_steps - step) / steps_per_sec))
          speed = f'  {scalars["images_per_sec"]:.2f} images/s  ETA {eta}'
        writer.scalars(step, scalars)
        logging.info('step %d/%d  loss %.4f  lr %.3g%s', step, num_steps, scalars['loss'],
                     scalars['lr'], speed)
        window_start, window_step, window_loss = time.time(), step, []
      preempted = ckpt.preempted(step)
      if preempted or (step % config.checkpoint_every_steps == 0 and step < num_steps):
        nnx.update((model, optimizer), state)
        ckpt.save(step, model, optimizer)
        saved_step = step
      if preempted:
        logging.warning('Preempted: saved step %d in %s; run again to resume.', step, workdir)
        return None
    nnx.update((model, optimizer), state)

    # ---- Evaluation and the final checkpoint ----------------------------------------------
    metrics = None
    try:
      metrics = _evaluate(model, config, data_dir, mesh, workdir, step, writer)
      logging.info('step %d: mAUPR %.4f  mIoU %.4f  mF1 %.4f', step, metrics['mAUPR'],
                   metrics['mIoU'], metrics['mF1'])
    finally:
      if step > 0 and saved_step != step:
        ckpt.save(step, model, optimizer, metrics=metrics)
    return metrics
  finally:
    ckpt.close()
    writer.close()


def evaluate_checkpoint(config, workdir, checkpoint=''):
  """Evaluates a checkpoint (default: the latest in `workdir`) and writes the report to `workdir`.

  Args:
    config: the config; `config.model` must match the checkpoint's.
    workdir: where metrics.json, the table and the plots go (and the data is prepared).
    checkpoint: an orbax checkpoint directory (e.g. written by `m2mrf_jax.convert`).

  Returns:
    The metrics dict.
  """
  validate_config(config)
  mesh = make_mesh()
  model = checkpoints.restore_model(checkpoint or workdir, config.model,
                                    sharding=NamedSharding(mesh, P()))
  data_dir = data_pipelines.prepare(config.data, workdir)
  writer = summary.SummaryWriter(workdir)
  try:
    step = checkpoints.read_meta(checkpoint or workdir)['step']
    return _evaluate(model, config, data_dir, mesh, workdir, step, writer)
  finally:
    writer.close()
