"""Every orbax call of the project: model checkpoints and the training checkpoint manager.

A checkpoint directory is an `ocp.CheckpointManager` directory (one subfolder per step) whose
steps hold Composite items:
  model      StandardSave of the pure dict of `nnx.state(model)` (parameters and BN statistics)
  meta       JsonSave: {'model': model config dict, 'step': int, 'config': full config (training)}
  opt_state  StandardSave of the pure dict of `nnx.state(optimizer)` (training only)
  model_card JsonSave to STEP/model_card/model_card.json (`model_card`): what the weights are, how to
             feed them and what they are for; `checked_card` refuses a config that contradicts it

Training resumes the data at the saved step (global batch k is a function of the seed and k), so no
data state is saved; the `data` item of older checkpoints (grain iterator states) is ignored.
"""
import json
import signal
import threading

from absl import logging
from etils import epath
from flax import nnx
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

import m2mrf_jax
from data_pipelines import lesions
from m2mrf_jax import mesh as mesh_lib

# Model config keys that change the parameter tree; dtype and remat do not.
STRUCTURE_KEYS = ('variant', 'down', 'up', 'width', 'num_classes', 'patch_size', 'encode_rate', 'fc_rate')


def _to_dict(config):
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def _describe(model_config):
  return f'variant {model_config.get("variant")} width {model_config.get("width")}'


def check_model_config(directory, saved, wanted):
  """Raises ValueError when a checkpoint's model config differs from the requested one.

  Args:
    directory: the checkpoint directory (for the message).
    saved: model config dict stored in the checkpoint's `meta`.
    wanted: the model config the caller asks for.
  """
  wanted = _to_dict(wanted)
  diffs = [k for k in STRUCTURE_KEYS if k in saved and saved[k] != wanted.get(k)]
  if diffs:
    details = ', '.join(f'{k}={saved[k]!r} (config {wanted.get(k)!r})' for k in diffs)
    raise ValueError(
        f'checkpoint at {directory} is {_describe(saved)}; config asks for {_describe(wanted)}'
        f' [{details}]')


CARD_ITEM, CARD_FILE = 'model_card', 'model_card.json'
INTENDED_USE = ('research on lesion segmentation and grading of fundus images; not for diagnosis or '
                'any clinical decision')
# The card fields a config determines: a config that gives another value is refused.
CARD_CHECKED = ('task', 'variant', 'down', 'up', 'width', 'num_classes', 'classes', 'dataset',
                'img_scale', 'image_size', 'mean', 'std')


def model_card(config, step, metrics=None):
  """The model card (a JSON-ready dict) of a checkpoint of `config` after `step` training steps.

  Args:
    config: the full config (segmentation, configs/common.py, or grading, configs/grading_common.py).
    step: optimizer steps taken (0 for a converted checkpoint).
    metrics: the evaluation metrics at save time, if any (their scalars are kept).
  """
  model, data = config.model, config.data
  if config.get('task') == 'grading':
    from m2mrf_jax.grading import metrics as grading_metrics  # pylint: disable=g-import-not-at-top
    side = model.side
    card = dict(task='grading', model='SiAN: Inception-v3 + M2MRF-HRNetV2 side branch',
                variant=side.variant, down=side.down, up=side.up, width=side.width,
                num_classes=model.num_classes,
                classes=(grading_metrics.GRADES + (grading_metrics.UNGRADABLE,))[:model.num_classes],
                dataset=data.name, image_size=data.image_size, mean=model.side_mean,
                std=model.side_std,
                input='RGB uint8, long side resized to image_size and padded black to a square; the '
                      'side branch normalises with (x - mean) / std')
  else:
    card = dict(task='segmentation', model='M2MRF-HRNetV2', variant=model.variant, down=model.down,
                up=model.up, width=model.width, num_classes=model.num_classes,
                classes=lesions.CLASSES[:model.num_classes], dataset=data.name,
                img_scale=data.img_scale, mean=data.mean, std=data.std,
                input='RGB, resized keeping the ratio into img_scale (long, short), then '
                      '(x - mean) / std; one sigmoid per class, in the order of classes')
  scalars = {k: float(v) for k, v in (metrics or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  card.update(training_steps=int(step), num_train_steps=config.get('num_train_steps'),
              metrics=scalars, intended_use=INTENDED_USE, version=m2mrf_jax.__version__)
  return json.loads(json.dumps(card))  # tuples -> lists, as read back


def read_card(directory, step=None):
  """The model card of a checkpoint (the latest step if `step` is None), or None if it has none."""
  with _manager(directory, _READ_ONLY) as manager:
    step = _restore_step(manager, directory, step)
    path = epath.Path(manager.directory) / str(step) / CARD_ITEM / CARD_FILE
  return json.loads(path.read_text()) if path.exists() else None


def format_card(card):
  """The card as `key: value` lines, for the console."""
  def value(v):
    return ', '.join(map(str, v)) if isinstance(v, list) else repr(v) if v == '' else v
  metrics = '  '.join(f'{k} {v:.4f}' for k, v in card['metrics'].items()) or 'none'
  return '\n'.join([f'  {k}: {value(v)}' for k, v in card.items() if k != 'metrics'] +
                   [f'  metrics at save: {metrics}'])


def check_card(directory, card, config):
  """Raises ValueError when `config` gives another value than the card for a CARD_CHECKED field."""
  wanted = model_card(config, 0)
  diffs = [k for k in CARD_CHECKED if card.get(k) != wanted.get(k)]
  if diffs:
    raise ValueError(f'the model card of {directory} contradicts the config: ' + '; '.join(
        f'{k} is {card.get(k)!r} in the card, {wanted.get(k)!r} in the config' for k in diffs))


def checked_card(directory, config, step=None):
  """Reads, logs and checks the card of a checkpoint against `config`; returns it (None: no card).

  Raises:
    ValueError: the card contradicts the config (`check_card`).
  """
  card = read_card(directory, step)
  if card is None:
    logging.warning('%s has no model card (written before cards existed): only its model structure '
                    'is checked against the config.', directory)
    return None
  logging.info('model card of %s:\n%s', directory, format_card(card))
  check_card(directory, card, config)
  return card


def _abstract(tree, sharding=None):
  """ShapeDtypeStructs of a pytree of arrays, keeping their shardings unless one is given."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, 'sharding', None))
  return jax.tree.map(leaf, tree)


def _manager(directory, options=None):
  handlers = dict(model=ocp.StandardCheckpointHandler(), opt_state=ocp.StandardCheckpointHandler(),
                  meta=ocp.JsonCheckpointHandler(),
                  **{CARD_ITEM: ocp.JsonCheckpointHandler(filename=CARD_FILE)})
  return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options,
                               item_handlers=handlers)


# Explicit save_interval_steps and create: orbax warns when read_only has to change them.
_READ_ONLY = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)


def _restore_step(manager, directory, step):
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  if step not in manager.all_steps():
    raise FileNotFoundError(f'no step {step} in {directory}; steps: {list(manager.all_steps())}')
  return step


def read_meta(directory, step=None):
  """Returns the `meta` dict of a checkpoint (the latest step if `step` is None)."""
  with _manager(directory, _READ_ONLY) as manager:
    step = _restore_step(manager, directory, step)
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def save_model(directory, model, config, step=0):
  """Writes `model` (parameters and BN statistics) and its card as step `step` of a checkpoint directory.

  Args:
    directory: checkpoint directory (created if needed).
    model: the NNX model.
    config: the full config; `config.model` is stored in `meta` and checked by `restore_model`, the
      rest goes into the model card.
    step: the step number of the checkpoint.
  """
  with _manager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
        meta=ocp.args.JsonSave({'model': _to_dict(config.model), 'step': int(step)}),
        **{CARD_ITEM: ocp.args.JsonSave(model_card(config, step))}), force=True)
    manager.wait_until_finished()


def restore_model(directory, model_config, step=None, sharding=None, build=None):
  """Builds the model of `model_config` and loads a checkpoint into it.

  Args:
    directory: a checkpoint directory written by `save_model` or by training.
    model_config: `config.model`; its structure must match the checkpoint's.
    step: step to load; the latest if None.
    sharding: where the arrays go; replicated over all devices if None.
    build: (model_config, rngs) -> model; the segmentor's `models.build` if None.

  Returns:
    The restored NNX model (in train mode, as `build` returns it).
  """
  if build is None:
    from m2mrf_jax import models  # pylint: disable=g-import-not-at-top
    build = models.build
  with _manager(directory, _READ_ONLY) as manager:
    step = _restore_step(manager, directory, step)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    check_model_config(directory, meta['model'], model_config)
    abstract_model = nnx.eval_shape(lambda: build(model_config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract_model)
    target = _abstract(nnx.to_pure_dict(state), sharding or mesh_lib.replicated(mesh_lib.make_mesh()))
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target))).model
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


class TrainCheckpointer:
  """The training checkpoint manager: full state, last k + best by mAUPR, save on SIGTERM.

  Usage:
    with TrainCheckpointer(workdir, config) as ckpt:
      step = ckpt.restore(model, optimizer)   # 0 when the workdir is empty
      ... ckpt.save(step, model, optimizer) ...
      if ckpt.preempted(step): ckpt.save(...); stop
  """

  def __init__(self, directory, config, *, keep=None, best_metric='mAUPR',
               handle_sigterm=True, async_save=True):
    """Opens (or creates) the manager.

    Args:
      directory: the checkpoint directory (the workdir).
      config: the full config; `config.model` guards resumption, the rest is stored in `meta`.
      keep: how many most recent checkpoints to keep (default `config.keep_checkpoints`).
      best_metric: metric whose best checkpoint is kept as well, when saved with metrics.
      handle_sigterm: install a SIGTERM handler that makes `preempted` true.
      async_save: write in a background thread (arrays are copied to host before returning).
    """
    self.directory = epath.Path(directory).absolute()
    self.config = config
    keep = config.get('keep_checkpoints', 3) if keep is None else keep
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    self.manager = _manager(self.directory, ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save))
    self._sigterm = threading.Event()
    self._previous_handler = None
    if handle_sigterm and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the end of this step.')
    self._sigterm.set()

  def latest_step(self):
    return self.manager.latest_step()

  def preempted(self, step):
    """True once SIGTERM was received or the cluster announced a preemption."""
    return self._sigterm.is_set() or self.manager.reached_preemption(step)

  def save(self, step, model, optimizer, metrics=None, force=True):
    """Saves the full training state as step `step` (every process must call this).

    Args:
      step: the number of optimizer steps taken.
      model: the NNX model.
      optimizer: its `nnx.Optimizer`.
      metrics: optional dict of scalars (e.g. with 'mAUPR') used to keep the best checkpoint.
      force: save even if the manager's own policy would skip this step.

    Returns:
      Whether a checkpoint was started.
    """
    card = model_card(self.config, step, metrics)
    items = dict(
        model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
        opt_state=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
        meta=ocp.args.JsonSave({'model': _to_dict(self.config.model), 'step': int(step),
                                'config': _to_dict(self.config)}),
        **{CARD_ITEM: ocp.args.JsonSave(card)})
    started = self.manager.save(step, args=ocp.args.Composite(**items),
                                metrics=card['metrics'] if metrics is not None else None, force=force)
    if started:
      logging.info('checkpoint: step %d -> %s', step, self.directory / str(step))
    return started

  def restore(self, model, optimizer, step=None):
    """Loads a training checkpoint into `model` and `optimizer` in place.

    Args:
      model: the NNX model (concrete arrays; their shardings are kept).
      optimizer: its `nnx.Optimizer`.
      step: the step to load; the latest if None.

    Returns:
      The restored step, or 0 when the directory holds no checkpoint.

    Raises:
      ValueError: the checkpoint holds another variant or width than `config.model`.
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return 0
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    try:
      check_model_config(self.directory, meta['model'], self.config.model)
    except ValueError as e:
      raise ValueError(f'refusing to resume: {e}. Use another --workdir.') from None
    model_state, opt_state = nnx.state(model), nnx.state(optimizer)
    items = dict(
        model=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(model_state))),
        opt_state=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt_state))))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    nnx.replace_by_pure_dict(model_state, restored.model)
    nnx.replace_by_pure_dict(opt_state, restored.opt_state)
    nnx.update(model, model_state)
    nnx.update(optimizer, opt_state)
    return int(meta['step'])

  def close(self):
    """Waits for pending writes, closes the manager and restores the previous SIGTERM handler."""
    self.manager.wait_until_finished()
    self.manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
