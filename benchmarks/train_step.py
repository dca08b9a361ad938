"""Training throughput and memory of the jitted train step, per variant, with bf16/remat on and off.

  python benchmarks/train_step.py --width=18 --crop=128 --variants=base,c --batch=2 --steps=5

Prints one row per (variant, bf16, remat): compile time, images/s over `--steps` timed steps
(after one warm-up step), XLA's memory estimate of the compiled step (arguments + temporaries),
and the device's peak memory where the backend reports it (GPU/TPU).
"""
import argparse
import itertools
import time

from flax import nnx
import jax
import numpy as np

from configs import common
from m2mrf_jax import losses
from m2mrf_jax import mesh as mesh_lib
from m2mrf_jax import train


def _on_off(value):
  return {'on': [True], 'off': [False], 'both': [False, True]}[value]


def measure(variant, width, crop, batch_size, steps, bf16, remat):
  """Returns (compile seconds, images/s, compiled memory GiB, device peak GiB or nan)."""
  config = common.get_config('idrid', variant)
  config.model.width, config.model.dtype, config.model.remat = width, (
      'bfloat16' if bf16 else 'float32'), remat
  config.batch_size, config.num_train_steps = batch_size, 1000
  mesh = mesh_lib.make_mesh()
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = train.make_train_step(graphdef, losses.dice_loss, mesh)
  rng = np.random.default_rng(0)
  batch = mesh_lib.global_batch(mesh, {
      'image': rng.normal(size=(batch_size, crop, crop, 3)).astype(np.float32),
      'label': (rng.random((batch_size, crop, crop, 4)) < 0.01).astype(np.uint8)})
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  compiled_gib = ((analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / 2**30
                  if analysis is not None else float('nan'))
  state, loss = compiled(state, batch)
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    state, loss = compiled(state, batch)
  loss.block_until_ready()
  images_per_s = steps * batch_size / (time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use', float('nan')) / 2**30
  return compile_s, images_per_s, compiled_gib, peak


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=int, default=18)
  parser.add_argument('--crop', type=int, default=128, help='square crop side')
  parser.add_argument('--variants', default='base,a,b,c,d')
  parser.add_argument('--batch', type=int, default=2, help='global batch')
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--bf16', choices=['on', 'off', 'both'], default='both')
  parser.add_argument('--remat', choices=['on', 'off', 'both'], default='both')
  args = parser.parse_args()
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}; HRNetV2-W{args.width}, '
        f'crop {args.crop}x{args.crop}, global batch {args.batch}, {args.steps} timed steps')
  print(f'{"variant":8}{"bf16":>6}{"remat":>7}{"compile s":>11}{"images/s":>10}'
        f'{"XLA GiB":>9}{"peak GiB":>10}')
  for variant, bf16, remat in itertools.product(
      args.variants.split(','), _on_off(args.bf16), _on_off(args.remat)):
    compile_s, speed, compiled_gib, peak = measure(
        variant, args.width, args.crop, args.batch, args.steps, bf16, remat)
    print(f'{variant:8}{bf16!s:>6}{remat!s:>7}{compile_s:11.1f}{speed:10.2f}'
          f'{compiled_gib:9.2f}{peak:10.2f}', flush=True)


if __name__ == '__main__':
  main()
