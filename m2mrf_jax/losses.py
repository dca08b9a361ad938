"""Training losses and the learning-rate schedule (pure functions).

Shapes: logits (N, H, W, C) at the label size, labels (N, H, W, C) in {0, 1} (multi-hot, any dtype),
C = 4 lesion classes (EX, HE, SE, MA), no background channel.
"""
import jax
import jax.numpy as jnp
import optax


def _check(logits, labels):
  if logits.shape != labels.shape:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} must have the same '
                     '(N, H, W, C) shape: the model returns logits at the input (label) size')
  return jax.nn.sigmoid(logits.astype(jnp.float32)), labels.astype(jnp.float32)


def dice_loss(logits, labels, smooth=1e-5):
  """The official BinaryLoss(loss_type='dice'): sigmoid Dice per sample and class.

  d[n, c] = 1 - (2 sum_hw p y + smooth) / (sum_hw p + sum_hw y + smooth), averaged over classes,
  then over the batch. Padded pixels are labelled 0 and count as background.

  Args:
    logits: (N, H, W, C) float.
    labels: (N, H, W, C) in {0, 1}.
    smooth: the official 1e-5.

  Returns:
    The scalar float32 loss.
  """
  p, y = _check(logits, labels)
  intersection = jnp.sum(p * y, axis=(1, 2))
  total = jnp.sum(p, axis=(1, 2)) + jnp.sum(y, axis=(1, 2))
  return jnp.mean(1.0 - (2.0 * intersection + smooth) / (total + smooth))


def _squared_dice(p, t, smooth):
  """V-Net Dice pooled over every element: 1 - 2 sum p t / (sum p^2 + sum t^2)."""
  return 1.0 - (2.0 * jnp.sum(p * t) + smooth) / (jnp.sum(p * p) + jnp.sum(t * t) + smooth)


def dual_loss(logits, labels, lam=0.8, smooth=1e-5):
  """The L-Net dual loss (Wei et al., eq. 2-3): lam * pixel Dice + (1 - lam) * image Dice.

  Both Dice terms are the paper's squared-denominator Dice pooled over the whole batch and all
  classes; the image-level presence P[n, c] (and its target T[n, c]) is the global max over H, W of
  the probabilities (labels). `smooth` (absent in the paper) only guards the all-empty case.

  Args:
    logits: (N, H, W, C) float.
    labels: (N, H, W, C) in {0, 1}.
    lam: the paper's lambda, 0.8.
    smooth: added to numerator and denominator of both Dice terms.

  Returns:
    The scalar float32 loss.
  """
  p, y = _check(logits, labels)
  pixel = _squared_dice(p, y, smooth)
  image = _squared_dice(jnp.max(p, axis=(1, 2)), jnp.max(y, axis=(1, 2)), smooth)
  return lam * pixel + (1.0 - lam) * image


def get_loss_fn(config):
  """The loss selected by `config.loss` ('dice' or 'dual'): (logits, labels) -> scalar."""
  if config.loss == 'dice':
    return dice_loss
  if config.loss == 'dual':
    return lambda logits, labels: dual_loss(logits, labels, lam=config.dual_lambda)
  raise ValueError(f"config.loss must be 'dice' or 'dual', got {config.loss!r}")


def poly_schedule(config):
  """The official poly policy: (lr - min_lr) * (1 - step / num_steps)^power + min_lr.

  Step counts optimizer updates already done, so the first update uses `config.learning_rate`.
  """
  return optax.polynomial_schedule(
      init_value=config.learning_rate, end_value=config.min_learning_rate,
      power=config.lr_power, transition_steps=max(config.num_train_steps, 1))


def sgd(config):
  """torch.optim.SGD(momentum, weight_decay) with the poly schedule.

  As torch: the decay (on every parameter) is added to the gradient before the momentum trace,
  the first trace equals the gradient, the learning rate scales the trace.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(poly_schedule(config), momentum=config.momentum))
