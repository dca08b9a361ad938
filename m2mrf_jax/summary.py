"""Run logs on process 0: `log.jsonl` (one JSON line per write) and TensorBoard events (tensorboardX)."""
import json
import os

import jax
import numpy as np
import tensorboardX

LOG_FILE = 'log.jsonl'


class Writer:
  """Scalars to `workdir/log.jsonl` and TensorBoard, images to TensorBoard; no-op off process 0.

  Usage: `with summary.Writer(workdir) as writer: writer.write_scalars(step, {'loss': 0.5})`.
  """

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, LOG_FILE), 'a')
    self._tb = tensorboardX.SummaryWriter(os.fspath(workdir), flush_secs=30)

  def write_scalars(self, step, values):
    """One JSON line {'step': step, **values} and one TensorBoard scalar per value."""
    if not self.active:
      return
    values = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    for tag, value in values.items():
      self._tb.add_scalar(tag, value, int(step))
    self._tb.flush()

  def write_image(self, step, tag, image):
    """A uint8 (H, W, 3) image under `tag` in TensorBoard."""
    if self.active:
      self._tb.add_image(tag, np.asarray(image, np.uint8), int(step), dataformats='HWC')
      self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
