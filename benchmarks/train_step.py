"""The jitted train step against a PyTorch train step of the same model, per variant, one process.

  python benchmarks/train_step.py --width=18 --crop=256 --variants=c --batch=2 --steps=5

For each variant: the JAX step of `train.make_train_step` (official Dice, SGD momentum 0.9 with weight
decay, the poly schedule) and a PyTorch step of tests/torch_reference.py's statement of the same network
with the same recipe (torch.optim.SGD(lr 0.01, momentum 0.9, weight_decay 5e-4), the official sigmoid
Dice per sample and class, train-mode BN), on the same random batch. After one warm-up step each, the two
alternate for `--steps` timed steps; medians. Prints JAX and PyTorch ms per step, their ratio, the JAX
compile seconds (and their parts: JAX's tracing + lowering, XLA's compile), XLA's memory estimate of the
compiled step (arguments + temporaries) and the device's peak memory where the backend reports it
(GPU/TPU). PyTorch runs on --threads threads (default: the cores); its column is empty where the JAX row
is bfloat16 or rematerialised (no PyTorch counterpart). Both steps share the process's allocator, so
`m2mrf_jax.cpu_runtime` (on unless $M2MRF_JAX_CPU_RUNTIME=0) applies to both.
"""
import argparse
import itertools
import os
import statistics
import sys
import time

from flax import nnx
import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import cpu_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position


def _on_off(value):
  return {'on': [True], 'off': [False], 'both': [False, True]}[value]


def make_batch(batch_size, crop):
  """A training batch as the pipeline's: uint8 pixels (the step normalises them), labels."""
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (batch_size, crop, crop, 3), dtype=np.uint8),
          'image_size': np.full((batch_size, 2), crop, np.int32),
          'label': (rng.random((batch_size, crop, crop, 4)) < 0.01).astype(np.uint8)}


def jax_step(variant, width, batch, bf16, remat):
  """(run: () -> None, (trace + lower, XLA compile) seconds, compiled memory GiB) of the JAX step."""
  config = common.get_config('idrid', variant)
  config.model.width, config.model.dtype, config.model.remat = width, (
      'bfloat16' if bf16 else 'float32'), remat
  config.batch_size, config.num_train_steps = batch['image'].shape[0], 1000
  mesh = mesh_lib.make_mesh()
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = train.make_train_step(graphdef, losses.dice_loss, mesh, config.data.mean, config.data.std)
  batch = mesh_lib.global_batch(mesh, batch)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = lowered_at - start, time.perf_counter() - lowered_at
  analysis = compiled.memory_analysis()
  compiled_gib = ((analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / 2**30
                  if analysis is not None else float('nan'))
  holder = [state]

  def run():
    holder[0], loss = compiled(holder[0], batch)
    loss.block_until_ready()

  return run, compile_s, compiled_gib


def torch_step(variant, width, batch, threads):
  """() -> None: one PyTorch SGD step of the statement (official Dice), or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
    import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'PyTorch statement unavailable ({e}); JAX only')
    return None
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = torch_reference.build_torch_model(variant, width).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  data = common.data_config('idrid')
  images = torch.from_numpy(np.stack([transforms.normalize(image, data.mean, data.std)
                                      for image in batch['image']]).transpose(0, 3, 1, 2).copy())
  labels = torch.from_numpy(batch['label'].transpose(0, 3, 1, 2).astype(np.float32))

  def run():
    p = torch.sigmoid(model(images))  # logits at the input (label) size
    intersection = (p * labels).sum((2, 3))
    total = p.sum((2, 3)) + labels.sum((2, 3))
    loss = (1 - (2 * intersection + 1e-5) / (total + 1e-5)).mean()  # per sample and class
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  return run


def _timed(run):
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=int, default=18)
  parser.add_argument('--crop', type=int, default=256, help='square crop side')
  parser.add_argument('--variants', default='c')
  parser.add_argument('--batch', type=int, default=2, help='global batch')
  parser.add_argument('--steps', type=int, default=5, help='timed steps of each')
  parser.add_argument('--bf16', choices=['on', 'off', 'both'], default='off')
  parser.add_argument('--remat', choices=['on', 'off', 'both'], default='off')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; HRNetV2-W'
        f'{args.width}, crop {args.crop}x{args.crop}, global batch {args.batch}, median of {args.steps} '
        f'alternated steps; {cpu_runtime.describe()}; load average '
        f'{os.getloadavg()[0]:.1f}')
  print(f'{"variant":8}{"bf16":>6}{"remat":>7}{"compile s":>11}{"(lower":>8}{"+ XLA)":>8}'
        f'{"JAX ms":>9}{"torch ms":>10}'
        f'{"ratio":>7}{"XLA GiB":>9}{"peak GiB":>10}', flush=True)
  batch = make_batch(args.batch, args.crop)
  for variant in args.variants.split(','):
    reference = torch_step(variant, args.width, batch, args.threads)
    for bf16, remat in itertools.product(_on_off(args.bf16), _on_off(args.remat)):
      run, compile_s, compiled_gib = jax_step(variant, args.width, batch, bf16, remat)
      comparable = reference is not None and not bf16 and not remat
      run()
      if comparable:
        reference()
      jax_times, torch_times = [], []
      for _ in range(args.steps):
        jax_times.append(_timed(run))
        if comparable:
          torch_times.append(_timed(reference))
      jax_ms = 1e3 * statistics.median(jax_times)
      torch_text = f'{"-":>10}{"-":>7}'
      if torch_times:
        torch_ms = 1e3 * statistics.median(torch_times)
        torch_text = f'{torch_ms:10.0f}{jax_ms / torch_ms:7.2f}'
      stats = jax.devices()[0].memory_stats() or {}
      peak = stats.get('peak_bytes_in_use', float('nan')) / 2**30
      print(f'{variant:8}{bf16!s:>6}{remat!s:>7}{sum(compile_s):11.1f}{compile_s[0]:8.1f}'
            f'{compile_s[1]:8.1f}{jax_ms:9.0f}{torch_text}'
            f'{compiled_gib:9.2f}{peak:10.2f}', flush=True)


if __name__ == '__main__':
  main()
