"""The training job: `train(config, workdir, train_data, evaluate_fn)`, and `train_and_evaluate`.

Data parallel with `jax.jit` over a 1-D device mesh ('data'): parameters, BN statistics and
optimizer state replicated, the global batch sharded over every device of every process. BatchNorm
inside the jitted step reduces over the global batch (SyncBN, as the official 4-GPU runs). Each process
puts its rows of the next two steps' batches on the devices while a step runs (`mesh.prefetch`), as uint8
pixels that the step normalises: the host never reads the device between log steps, nor makes it wait.
"""
import functools
import json
import math

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import pipeline
from data_pipelines import prepare
from data_pipelines import transforms
from m2mrf_jax import checkpoints
from m2mrf_jax import chrono as chrono_lib
from m2mrf_jax import convert
from m2mrf_jax import distributed
from m2mrf_jax import evaluate
from m2mrf_jax import losses
from m2mrf_jax import mesh as mesh_lib
from m2mrf_jax import models
from m2mrf_jax import report
from m2mrf_jax import summary

CONFIG_FILE = 'config.json'


def make_train_step(graphdef, loss_fn, mesh, mean, std):
  """The jitted step (state, batch) -> (state, loss) of one (micro-)batch; `state` is donated.

  The batch is `pipeline.train_iterator`'s, on device: {'image': uint8 (B, H, W, 3) zero-padded,
  'image_size': int (B, 2), 'label': uint8 (B, H, W, 4)}; the images are normalised here
  (`transforms.normalize_padded`, bit for bit the host's float32 normalisation).

  Args:
    graphdef: the graph definition of the pair (model, optimizer); state is `nnx.state` of the pair.
    loss_fn: (logits, labels) -> scalar.
    mesh: the device mesh; the state stays replicated on it.
    mean: RGB mean of the normalisation.
    std: RGB std of the normalisation.
  """
  replicated = mesh_lib.replicated(mesh)
  table = transforms.normalize_table(mean, std)

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(replicated, replicated))
  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    image = transforms.normalize_padded(batch['image'], batch['image_size'], table)

    def loss_of(model):
      return loss_fn(model(image), batch['label'].astype(jnp.float32))

    loss, grads = nnx.value_and_grad(loss_of)(model)  # BN statistics are updated in `model`
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return train_step


def optimizer_for(config):
  """SGD with the poly schedule; with `grad_accum_steps` k > 1, one update per k micro-batches.

  optax.MultiSteps averages the k gradients and calls SGD once, so the schedule, the momentum and the
  weight decay count updates, not micro-batches; BN statistics are updated once per micro-batch.
  """
  tx = losses.sgd(config)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx


def create_model_and_optimizer(config, mesh):
  """The freshly initialised model of `config.model` and its optimizer, replicated on `mesh`.

  Built eagerly (`layers.blocked_random` compiles a handful of random kernels: W48 in about 30 s on
  a CPU), then placed. One jitted initialisation with replicated out-shardings, as flax's GSPMD guide
  does, compiles ~2000 random kernels into one program: on the 2-core CPU, W48 had not compiled after
  15 min, W18 after 10 min.
  """
  model = models.build(config.model, nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, optimizer_for(config), wrt=nnx.Param)
  nnx.update((model, optimizer),
             jax.device_put(nnx.state((model, optimizer)), mesh_lib.replicated(mesh)))
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


def micro_batches(local_batch, accum_steps):
  """Splits this process's rows into `accum_steps` micro-batches: micro-batch i takes rows i, i + k, ..."""
  return [{k: v[i::accum_steps] for k, v in local_batch.items()} for i in range(accum_steps)]


def check_finite(loss_sum, first, last, ckpt, workdir):
  """Raises FloatingPointError if the summed losses of steps [first, last] are not finite."""
  loss = float(loss_sum)
  if not math.isfinite(loss):
    raise FloatingPointError(
        f'loss is {loss} within steps [{first}, {last}]: training stopped without saving this state; '
        f'the last good checkpoint (step {ckpt.latest_step()}) in {workdir} is intact.')
  return loss


def _check_batch(config):
  devices, accum = jax.device_count(), config.grad_accum_steps
  if config.batch_size % (accum * devices):
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of '
                     f'config.grad_accum_steps={accum} x {devices} devices (of '
                     f'{jax.process_count()} processes)')


def train(config, workdir, train_data, evaluate_fn):
  """Trains `config` in `workdir` (resuming from its latest checkpoint), then evaluates.

  Args:
    config: a config as `configs/common.py` describes it.
    workdir: holds the orbax checkpoints, config.json, log.jsonl and TensorBoard events.
    train_data: (start_step=, rows=) -> an iterator of this process's `rows` of global batches
      start_step, start_step + 1, ... {'image', 'image_size', 'label'} (`make_train_step`); each global
      batch is a function of (seed, step) alone, so resuming needs only the step
      (`pipeline.train_iterator`).
    evaluate_fn: (model, step, summary.Writer) -> metrics dict with 'mAUPR', 'mIoU', 'mF1'.

  Returns:
    The evaluation metrics, or None when preempted.
  """
  _check_batch(config)
  num_steps, accum = config.num_train_steps, config.grad_accum_steps

  # ---- Devices, config.json, model and optimizer ----------------------------------------
  mesh = mesh_lib.make_mesh()
  logging.info('%d devices over %d processes; global batch %d (%d per micro-step).',
               jax.device_count(), jax.process_count(), config.batch_size, config.batch_size // accum)
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
  model, optimizer = create_model_and_optimizer(config, mesh)

  with (summary.Writer(workdir) as writer,
        checkpoints.TrainCheckpointer(workdir, config) as ckpt):
    # ---- Resume, or start from the pretrained backbone ----------------------------------
    if ckpt.latest_step() is None:
      load_pretrained(config, model)
    step = ckpt.restore(model, optimizer)
    if step:
      logging.info('Resumed from step %d of %s.', step, workdir)
    if step < num_steps:  # global batch k is a function of (seed, k) alone: the step resumes it
      rows = distributed.process_rows(mesh_lib.data_sharding(mesh), config.batch_size)
      feed = mesh_lib.prefetch(  # two steps' micro-batches on their way to the devices ahead
          train_data(start_step=step, rows=rows),
          lambda local: [mesh_lib.global_batch(mesh, m) for m in micro_batches(local, accum)])

    # ---- Training loop: losses summed on device, read (and checked) at log and save steps --
    graphdef, state = nnx.split((model, optimizer))
    train_step = make_train_step(graphdef, losses.get_loss_fn(config), mesh, config.data.mean,
                                 config.data.std)
    schedule = losses.poly_schedule(config)
    chrono = chrono_lib.Chrono(num_steps)
    loss_sum, window_start = 0.0, step + 1
    while step < num_steps:
      for micro in next(feed):
        state, loss = train_step(state, micro)
        loss_sum = loss_sum + loss
      step += 1
      chrono.step_done(step)
      log = step % config.log_every_steps == 0 or step == num_steps
      preempted = ckpt.preempted(step)
      save = preempted or (step % config.checkpoint_every_steps == 0 and step < num_steps)
      if log or save:
        total = check_finite(loss_sum, window_start, step, ckpt, workdir)
      if log:
        scalars = {'loss': total / ((step - window_start + 1) * accum), 'lr': float(schedule(step - 1))}
        steps_per_sec, eta = chrono.measure(step)
        speed = ''
        if steps_per_sec is not None:
          scalars['images_per_sec'] = steps_per_sec * config.batch_size
          speed = f'  {scalars["images_per_sec"]:.2f} images/s  ETA {chrono_lib.hms(eta)}'
        writer.write_scalars(step, scalars)
        logging.info('step %d/%d  loss %.4f  lr %.3g%s', step, num_steps, scalars['loss'],
                     scalars['lr'], speed)
        loss_sum, window_start = 0.0, step + 1
      if save:
        with chrono.paused():
          nnx.update((model, optimizer), state)
          ckpt.save(step, model, optimizer)
      if preempted:
        logging.warning('Preempted: saved step %d in %s; run again to resume.', step, workdir)
        return None
    nnx.update((model, optimizer), state)

    # ---- Evaluation, then the final checkpoint (saved even if evaluation fails) ----------
    metrics = None
    try:
      metrics = evaluate_fn(model, step, writer)
      writer.write_scalars(step, report.scalars(metrics))
      logging.info('step %d: mAUPR %.4f  mIoU %.4f  mF1 %.4f', step, metrics['mAUPR'],
                   metrics['mIoU'], metrics['mF1'])
    finally:
      if step > 0 and ckpt.latest_step() != step:
        ckpt.save(step, model, optimizer, metrics=metrics)
    return metrics


def train_and_evaluate(config, workdir):
  """`train` with the real data: the dataset prepared (built on first use), its train iterator and
  the official evaluation of `config.eval_split` (table, metrics.json, PR curves, TensorBoard)."""
  _check_batch(config)  # before anything is prepared or written
  data_dir = prepare.prepare(config.data, workdir)
  train_data = functools.partial(pipeline.train_iterator, config.data, data_dir,
                                 batch_size=config.batch_size, seed=config.seed)
  examples = pipeline.eval_dataset(config.data, data_dir, config.eval_split)

  def evaluate_fn(model, step, writer):
    scores = evaluate.score(model, examples, config)
    report.write(scores, workdir, writer, step)
    return scores

  return train(config, workdir, train_data, evaluate_fn)
