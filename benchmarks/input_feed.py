"""The training loop's input feed, former against new: bytes sent and host CPU per step, steps/s.

  python benchmarks/input_feed.py [--crop=960x1440] [--batch=4] [--steps=20] [--width=4]

Three feeds of the same batches to the same step (a tiny conv + BN segmenter, `tests/tiny_model.py`, so
the feed is a visible share of the step; HRNet's step would hide it on a CPU):
  float32        the former loop: the host normalises (`transforms.normalize`, then Pad 0), sends
                 float32, and puts each batch when the step asks for it;
  uint8          uint8 pixels and their sizes sent, normalised in the step (`transforms.normalize_padded`);
  uint8+prefetch the new loop: as uint8, with two batches put ahead (`mesh.prefetch`).
"host CPU ms" is the process CPU time to prepare and put one batch (no step running). Losses are summed on
device and read once at the end of a pass, as the loop does between log steps. On a CPU the
"device" is the host's own cores, so the transfer is a memcpy and prefetching overlaps little; the
bytes column is what an accelerator's host link carries.
"""
import argparse
import os
import statistics
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import tiny_model  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_batches(n, batch_size, crop, seed=0):
  """`n` pipeline-like batches: uint8 crops of random sizes (some padded), labels, sizes."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(n):
    sizes = np.stack([rng.integers(crop[0] // 2, crop[0] + 1, batch_size),
                      rng.integers(crop[1] // 2, crop[1] + 1, batch_size)], 1).astype(np.int32)
    image = np.zeros((batch_size,) + crop + (3,), np.uint8)
    label = np.zeros((batch_size,) + crop + (4,), np.uint8)
    for b, (h, w) in enumerate(sizes):
      image[b, :h, :w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      label[b, :h, :w] = rng.random((h, w, 4)) < 0.01
    batches.append({'image': image, 'image_size': sizes, 'label': label})
  return batches


def host_normalised(batch, data_config):
  """The former host path: each crop normalised as mmcv, then Pad 0, float32."""
  image = np.stack([transforms.pad_to(transforms.normalize(x[:h, :w], data_config.mean,
                                                           data_config.std), x.shape[:2])
                    for x, (h, w) in zip(batch['image'], batch['image_size'])])
  return {'image': image, 'label': batch['label']}


def former_step(graphdef, mesh):
  """The step before issue 12: the host-normalised float32 image goes into the model."""
  replicated = mesh_lib.replicated(mesh)

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss_of = lambda m: losses.dice_loss(m(batch['image']), batch['label'].astype(jnp.float32))
    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated))


def run(config, mesh, batches, feed):
  """(seconds per step of 3 passes over `batches`, host->device bytes per step, host CPU seconds per
  batch to prepare and put it)."""
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  if feed == 'float32':
    step = former_step(graphdef, mesh)
    prepare = lambda b: host_normalised(b, config.data)
    stream = lambda: (mesh_lib.global_batch(mesh, prepare(b)) for b in batches)
  else:
    step = train.make_train_step(graphdef, losses.dice_loss, mesh, config.data.mean,
                                 config.data.std)
    prepare = lambda b: b
    if feed == 'uint8':
      stream = lambda: (mesh_lib.global_batch(mesh, b) for b in batches)
    else:
      stream = lambda: mesh_lib.prefetch(batches, lambda b: mesh_lib.global_batch(mesh, b))
  sent = sum(v.nbytes for v in prepare(batches[0]).values())
  start = time.process_time()  # the host's share: prepare and put each batch, no step
  for batch in batches:
    jax.block_until_ready(mesh_lib.global_batch(mesh, prepare(batch)))
  host = (time.process_time() - start) / len(batches)
  state, loss = step(state, mesh_lib.global_batch(mesh, prepare(batches[0])))  # compile
  loss.block_until_ready()
  times = []
  for _ in range(3):
    start = time.perf_counter()
    total = 0.0
    for batch in stream():
      state, loss = step(state, batch)
      total = total + loss
    float(total)
    times.append((time.perf_counter() - start) / len(batches))
  return times, sent, host


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--crop', default='960x1440', help='HxW: IDRiD training crop by default')
  parser.add_argument('--batch', type=int, default=4, help='global batch (official: 4)')
  parser.add_argument('--steps', type=int, default=20, help='steps per timed pass')
  parser.add_argument('--width', type=int, default=4, help='width of the tiny segmenter')
  args = parser.parse_args()
  crop = tuple(int(v) for v in args.crop.split('x'))
  models.build = tiny_model.TinySegmenter  # the network is not what is measured
  config = common.get_config('idrid', 'c')
  config.model.width, config.batch_size = args.width, args.batch
  mesh = mesh_lib.make_mesh()
  batches = make_batches(args.steps, args.batch, crop)
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; tiny segmenter '
        f'width {args.width}, crop {crop[0]}x{crop[1]}, global batch {args.batch}, {args.steps} steps, '
        f'3 passes; load average {os.getloadavg()[0]:.1f}')
  print(f'{"feed":16}{"MB sent/step":>14}{"host CPU ms":>13}{"ms/step median":>16}{"min":>8}'
        f'{"steps/s":>9}{"vs float32":>12}', flush=True)
  reference = None
  for feed in ('float32', 'uint8', 'uint8+prefetch'):
    times, sent, host = run(config, mesh, batches, feed)
    seconds = statistics.median(times)
    reference = reference or seconds
    print(f'{feed:16}{sent / 1e6:14.2f}{host * 1e3:13.1f}{seconds * 1e3:16.1f}{min(times) * 1e3:8.1f}{1 / seconds:9.2f}'
          f'{reference / seconds:11.2f}x', flush=True)


if __name__ == '__main__':
  main()
