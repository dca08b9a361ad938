"""The jitted train step against a PyTorch train step of the same model, per variant, one process.

  python benchmarks/train_step.py --width=18 --crop=256 --variants=c --batch=2 --steps=5
  python benchmarks/train_step.py --width=48 --crop=960x1440 --batch=4 --bf16=both   # a GPU

For each variant: the JAX step of `train.make_train_step` (official Dice, SGD momentum 0.9 with weight
decay, the poly schedule) and a PyTorch step of tests/torch_reference.py's statement of the same network
with the same recipe (torch.optim.SGD(lr 0.01, momentum 0.9, weight_decay 5e-4), the official sigmoid
Dice per sample and class, train-mode BN), on the same random batch. After one warm-up step each, the two
alternate for `--steps` timed steps; medians. Prints JAX and PyTorch ms per step, their ratio, the JAX
compile seconds (and their parts: JAX's tracing + lowering, XLA's compile), JAX's images/s, its model
FLOP utilisation (XLA's FLOPs of the step per second, as a share of a jitted square matmul's measured
rate in the row's dtype), the hours 40k such steps take (the IDRiD recipe, at this step time), XLA's
memory estimate of the compiled step (arguments + temporaries) and each side's peak device memory where
the backend reports it (GPU/TPU; JAX's since the process began, PyTorch's over the row). PyTorch runs
on `--torch_device` (CUDA where torch has it, else the CPU, on --threads threads); a bfloat16 row's
PyTorch step runs under torch.autocast(bfloat16), float32 parameters as JAX's; its column is empty where
the JAX row is rematerialised (no PyTorch counterpart).
Both steps share the process's allocator, so `m2mrf_jax.cpu_runtime` (on unless
$M2MRF_JAX_CPU_RUNTIME=0) applies to both on CPU.
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
from benchmarks.compiled import matmul_rate  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.model_forward import torch_device, wait  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import cpu_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position


def _on_off(value):
  return {'on': [True], 'off': [False], 'both': [False, True]}[value]


RECIPE_STEPS = 40_000  # the official IDRiD schedule (configs/common.py)


def make_batch(batch_size, crop):
  """A training batch as the pipeline's: uint8 pixels (the step normalises them), labels; crop (h, w)."""
  rng = np.random.default_rng(0)
  h, w = crop
  return {'image': rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8),
          'image_size': np.tile(np.array([h, w], np.int32), (batch_size, 1)),
          'label': (rng.random((batch_size, h, w, 4)) < 0.01).astype(np.uint8)}


def jax_step(variant, width, batch, bf16, remat):
  """(run: () -> None, (trace + lower, XLA compile) seconds, compiled memory GiB, XLA FLOPs) of the step."""
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
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = [state]

  def run():
    holder[0], loss = compiled(holder[0], batch)
    loss.block_until_ready()

  return run, compile_s, compiled_gib, (cost or {}).get('flops', float('nan'))


def torch_step(variant, width, batch, threads, device):
  """bf16 -> (() -> None): one PyTorch SGD step of the statement (official Dice); None without torch.

  `device`: 'auto' (CUDA where torch has it, else the CPU), or a torch device string. The step waits
  for the device (torch.cuda.synchronize) so that its time is the step's.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
    import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'PyTorch statement unavailable ({e}); JAX only')
    return None
  device = torch_device(torch, device)
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = torch_reference.build_torch_model(variant, width).train().to(device)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  data = common.data_config('idrid')
  images = torch.from_numpy(np.stack([transforms.normalize(image, data.mean, data.std)
                                      for image in batch['image']]).transpose(0, 3, 1, 2).copy())
  labels = torch.from_numpy(batch['label'].transpose(0, 3, 1, 2).astype(np.float32))
  images, labels = images.to(device), labels.to(device)

  def step(bf16):
    def run():
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(images)  # at the input (label) size
      p = torch.sigmoid(logits.float())
      intersection = (p * labels).sum((2, 3))
      total = p.sum((2, 3)) + labels.sum((2, 3))
      loss = (1 - (2 * intersection + 1e-5) / (total + 1e-5)).mean()  # per sample and class
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      wait(torch, loss)
    return run

  def peak_gib():
    """CUDA's peak allocated GiB since the last call (NaN on CPU)."""
    if device.type != 'cuda':
      return float('nan')
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return gib

  step.device, step.peak_gib = device, peak_gib
  return step


def _timed(run):
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=int, default=18)
  parser.add_argument('--crop', default='256', help='crop side, or HxW')
  parser.add_argument('--variants', default='c')
  parser.add_argument('--batch', type=int, default=2, help='global batch')
  parser.add_argument('--steps', type=int, default=5, help='timed steps of each')
  parser.add_argument('--bf16', choices=['on', 'off', 'both'], default='off')
  parser.add_argument('--remat', choices=['on', 'off', 'both'], default='off')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--torch_device', default='auto', help="'auto': CUDA where torch has it")
  args = parser.parse_args()
  crop = tuple(int(v) for v in args.crop.split('x')) * (1 if 'x' in args.crop else 2)
  batch = make_batch(args.batch, crop)
  references = {variant: torch_step(variant, args.width, batch, args.threads, args.torch_device)
                for variant in args.variants.split(',')}
  rates = {bf16: matmul_rate(jax.numpy.bfloat16 if bf16 else jax.numpy.float32)
           for bf16 in _on_off(args.bf16)}
  torch_on = next(iter(references.values()))
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; HRNetV2-W'
        f'{args.width}, crop {crop[0]}x{crop[1]}, global batch {args.batch}, median of {args.steps} '
        f'alternated steps; PyTorch on {torch_on.device if torch_on else "-"}; matmul peak '
        + ', '.join(f'{"bfloat16" if k else "float32"} {v / 1e12:.2f} TFLOP/s' for k, v in rates.items())
        + f'; {cpu_runtime.describe()}; load average {os.getloadavg()[0]:.1f}')
  print(f'{"variant":8}{"bf16":>6}{"remat":>7}{"compile s":>11}{"(lower":>8}{"+ XLA)":>8}'
        f'{"JAX ms":>9}{"torch ms":>10}{"ratio":>7}{"img/s":>8}{"MFU %":>7}{"40k h":>7}'
        f'{"XLA GiB":>9}{"peak GiB":>10}{"torch GiB":>10}', flush=True)
  for variant, reference in references.items():
    for bf16, remat in itertools.product(_on_off(args.bf16), _on_off(args.remat)):
      run, compile_s, compiled_gib, flops = jax_step(variant, args.width, batch, bf16, remat)
      torch_run = reference(bf16) if reference is not None and not remat else None
      run()
      if torch_run:
        torch_run()
      jax_times, torch_times = [], []
      for _ in range(args.steps):
        jax_times.append(_timed(run))
        if torch_run:
          torch_times.append(_timed(torch_run))
      jax_s = statistics.median(jax_times)
      torch_text = f'{"-":>10}{"-":>7}'
      if torch_times:
        torch_s = statistics.median(torch_times)
        torch_text = f'{1e3 * torch_s:10.0f}{jax_s / torch_s:7.2f}'
      stats = jax.devices()[0].memory_stats() or {}
      peak = stats.get('peak_bytes_in_use', float('nan')) / 2**30
      torch_gib = reference.peak_gib() if reference is not None else float('nan')
      print(f'{variant:8}{bf16!s:>6}{remat!s:>7}{sum(compile_s):11.1f}{compile_s[0]:8.1f}'
            f'{compile_s[1]:8.1f}{1e3 * jax_s:9.0f}{torch_text}{args.batch / jax_s:8.2f}'
            f'{100 * flops / jax_s / rates[bf16]:7.1f}{RECIPE_STEPS * jax_s / 3600:7.1f}'
            f'{compiled_gib:9.2f}{peak:10.2f}{torch_gib:10.2f}', flush=True)


if __name__ == '__main__':
  main()
