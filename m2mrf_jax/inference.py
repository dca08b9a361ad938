"""Logits of a segmentor at test time, with optional flip test-time augmentation (evaluate and predict).

`tta='flip'` is mmseg's `MultiScaleFlipAug(flip=True)` at one scale with its default
`flip_direction='horizontal'` (fundus photographs of left and right eyes are horizontal mirrors): the
model also sees the image mirrored left-right, its logits are mirrored back and the two are averaged.
mmseg (and the official M2MRF `EncoderDecoder.inference`) averages the sigmoid outputs instead; here the
logits are averaged, so the result is again a logit map and the official resize-then-sigmoid step, at
the original size, stays one step that does not know about TTA. Bilinear resizing is linear, so
averaging at the test scale equals averaging the resized logits.
"""
import jax.numpy as jnp

TTA_MODES = ('none', 'flip')


def check_tta(tta: str) -> str:
  """`tta` if it is one of TTA_MODES; a ValueError naming the setting otherwise."""
  if tta not in TTA_MODES:
    raise ValueError(f'tta must be one of {", ".join(TTA_MODES)}, got {tta!r}')
  return tta


def logits(model, images, tta: str = 'none'):
  """(N, h, w, 3) normalised images -> (N, h, w, C) logits of `model`, averaged over the TTA views."""
  out = model(images)
  if check_tta(tta) == 'flip':
    out = (out + jnp.flip(model(jnp.flip(images, axis=2)), axis=2)) / 2
  return out
