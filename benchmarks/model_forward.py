"""Forward time of the segmentor, JAX against the PyTorch statement with the same weights, one process.

  python benchmarks/model_forward.py --variants=base,c --width=48 --sizes=384x576,956x1440
  python benchmarks/model_forward.py --variants=c --sizes=960x1440 --batch=4 --bf16   # a GPU

For each (variant, size): the PyTorch statement (tests/torch_reference.py, randomised weights and BN
statistics, eval mode, no_grad) and the jitted JAX model loaded with its state_dict (`convert`), timed
in alternation (one JAX forward, one PyTorch forward, `--repeats` times; medians). Prints milliseconds
per batch, the ratio JAX / PyTorch, the JAX compile seconds, XLA's FLOPs of the forward and the achieved
GFLOP/s of each as a share of the measured matmul peak (the faster of jnp and torch on a float32 2048^3
matmul), the minor page faults of each side's median call (resource.getrusage: a call that faults its
buffers in again pays the kernel's zeroing, see m2mrf_jax.cpu_runtime), and the max difference of the
logits (scaled by the logit range) as a check that both run the same network. XLA:CPU runs on one thread
per core; PyTorch gets `--threads` (default: the number of cores) through torch.set_num_threads, so that
both use the same cores. PyTorch runs on `--torch_device` (CUDA where torch has it, else the CPU), each
forward waited for. `--bf16`: JAX computes in bfloat16 (config.model.dtype, float32 parameters) and
PyTorch under torch.autocast(bfloat16); the peak is then the bfloat16 matmul's. Both sides share the
process's allocator, so `m2mrf_jax.cpu_runtime` (on unless $M2MRF_JAX_CPU_RUNTIME=0) applies to both. `--torch_process=own` runs the PyTorch side instead in a
process of its own, with glibc's malloc defaults, as the official tools run (it never imports m2mrf_jax):
the same weights (a saved state_dict), the same input, still one JAX forward then one PyTorch forward,
and the logits check against that process's output.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def _matmul_peak(jnp, torch, device, bf16, repeats=5):
  """Measured square-matmul GFLOP/s in the benchmark's dtype (`compiled.matmul_rate`): (jnp, torch)."""
  from benchmarks import compiled  # pylint: disable=g-import-not-at-top (after sys.path has ROOT)
  n = compiled.matmul_size()
  at = torch.ones(n, n, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
  run = lambda: wait(torch, at @ at)
  run()
  torch_s = compiled.median_seconds(run, repeats)
  return (compiled.matmul_rate(jnp.bfloat16 if bf16 else jnp.float32, repeats) / 1e9,
          2 * n**3 / torch_s / 1e9)


def wait(torch, result):
  """`result` once its device has finished (torch.cuda.synchronize on CUDA)."""
  if result.is_cuda:
    torch.cuda.synchronize(result.device)
  return result


def _timed(fn):
  """(seconds, minor page faults) of one call of `fn`."""
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def _input(batch, h, w):
  """The benchmark's input (batch, h, w, 3) float32, the same in every process."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(0).standard_normal((batch, h, w, 3)).astype(np.float32)


def serve_torch(args):
  """The PyTorch side of --torch_process=own, on stdin/stdout.

  Loads the state_dict saved at `args.weights` into the PyTorch statement of `args.variants`, then per
  line: 'size B H W OUT' saves the logits (B, H, W, classes) of that input to OUT.npy ('ready');
  'run' times one forward ('SECONDS FAULTS').
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  device = torch_device(torch, args.torch_device)
  reference = torch_reference.build_torch_model(args.variants, args.width)
  reference.load_state_dict(torch.load(args.weights))
  reference.eval().to(device)
  forward = _torch_forward(torch, reference, args.bf16)
  with torch.no_grad():
    for line in sys.stdin:
      command, *fields = line.split()
      if command == 'size':
        batch, h, w = (int(v) for v in fields[:3])
        x = np.ascontiguousarray(_input(batch, h, w).transpose(0, 3, 1, 2))
        xt = torch.from_numpy(x).to(device)
        np.save(fields[3], forward(xt).float().cpu().numpy().transpose(0, 2, 3, 1))
        print('ready', flush=True)
      else:
        print(*_timed(lambda: forward(xt)), flush=True)


def torch_device(torch, name):
  """The torch device of --torch_device: 'auto' is CUDA where torch has it, else the CPU."""
  return torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else name)


def _torch_forward(torch, reference, bf16):
  """x -> logits of `reference`, under bfloat16 autocast if `bf16`, waited for."""
  device_type = next(reference.parameters()).device.type

  def forward(x):
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
      return wait(torch, reference(x))

  return forward


class TorchProcess:
  """The PyTorch statement with `reference`'s weights in a child process (`serve_torch`), the
  weights and logits passed through a temporary directory of its own."""

  def __init__(self, reference, variant, args):
    import torch  # pylint: disable=g-import-not-at-top
    self._directory = tempfile.TemporaryDirectory()
    weights = os.path.join(self._directory.name, 'weights.pt')
    torch.save(reference.state_dict(), weights)
    self._child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--torch_process=serve', f'--variants={variant}',
         f'--width={args.width}', f'--threads={args.threads}', f'--weights={weights}',
         f'--torch_device={args.torch_device}'] + ['--bf16'] * args.bf16,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def _ask(self, line):
    self._child.stdin.write(line + '\n')
    self._child.stdin.flush()
    reply = self._child.stdout.readline()
    if not reply:
      raise RuntimeError(f'the PyTorch process exited ({self._child.wait()}) after {line!r}')
    return reply.split()

  def logits(self, batch, h, w):
    """(batch, h, w, classes) logits of `_input(batch, h, w)`; later `run`s time that input."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    out = os.path.join(self._directory.name, 'logits.npy')
    self._ask(f'size {batch} {h} {w} {out}')
    return np.load(out)

  def run(self):
    """(seconds, minor page faults) of one forward in the child."""
    seconds, faults = self._ask('run')
    return float(seconds), int(faults)

  def close(self):
    self._child.stdin.close()
    self._child.wait()
    self._directory.cleanup()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default='base,c')
  parser.add_argument('--width', type=int, default=48)
  parser.add_argument('--sizes', default='384x576,956x1440', help='comma-separated HxW inputs')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3, help='timed forwards of each (medians)')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--torch_process', choices=('same', 'own', 'serve'), default='same',
                      help="PyTorch in this process, or in one of its own (glibc's defaults); "
                           "serve: that process's side")
  parser.add_argument('--weights', help='(serve) the state_dict to load')
  parser.add_argument('--torch_device', default='auto', help="'auto': CUDA where torch has it")
  parser.add_argument('--bf16', action='store_true', help='bfloat16 compute on both sides')
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  if args.torch_process == 'serve':
    return serve_torch(args)
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from configs import common
  from m2mrf_jax import convert
  from m2mrf_jax import cpu_runtime
  from m2mrf_jax import models
  import torch_reference
  # pylint: enable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  device = torch_device(torch, args.torch_device)
  jax_peak, torch_peak = _matmul_peak(jnp, torch, device, args.bf16)
  peak = max(jax_peak, torch_peak)
  dtype = 'bfloat16' if args.bf16 else 'float32'
  print(f'{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, torch {torch.__version__} on '
        f'{device} ({torch.get_num_threads()} threads), jax {jax.__version__}; HRNetV2-W{args.width}, '
        f'batch {args.batch}, {dtype}, eval, median of {args.repeats} alternated runs; {dtype} matmul '
        f'peak {peak:.0f} GFLOP/s (jnp {jax_peak:.0f}, torch {torch_peak:.0f}); '
        f'{cpu_runtime.describe()}; PyTorch in '
        f'{"this process" if args.torch_process == "same" else "its own process (glibc defaults)"}; '
        f'load average {os.getloadavg()[0]:.1f}')
  print(f'{"variant":8}{"size":>10}{"JAX ms":>9}{"torch ms":>10}{"ratio":>7}{"compile s":>10}'
        f'{"GFLOP":>7}{"JAX %pk":>8}{"torch %pk":>10}{"faults":>16}{"max diff":>10}', flush=True)

  class FixedKey:  # shape inference only: every value is overwritten by the state_dict
    def params(self):
      return jax.random.key(0)

  for variant in args.variants.split(','):
    torch.manual_seed(0)
    reference = torch_reference.randomize_(
        torch_reference.build_torch_model(variant, args.width), seed=1)
    model_config = common.model_config(variant, args.width)
    model_config.dtype = dtype
    abstract = nnx.eval_shape(lambda: models.build(model_config, FixedKey()))
    graphdef, state = nnx.split(abstract)
    model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    convert.load_state_dict(model, {k: v.numpy() for k, v in reference.state_dict().items()})
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    child = TorchProcess(reference, variant, args) if args.torch_process == 'own' else None
    torch_forward = None if child else _torch_forward(torch, reference.to(device), args.bf16)
    for size in args.sizes.split(','):
      h, w = (int(v) for v in size.split('x'))
      x = _input(args.batch, h, w)
      xj = jnp.asarray(x)
      start = time.perf_counter()
      compiled = forward.lower(state, xj).compile()
      compile_s = time.perf_counter() - start
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops = cost.get('flops', float('nan'))
      with torch.no_grad():
        if child:
          expected = child.logits(args.batch, h, w)
          torch_run = child.run
        else:
          xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
          expected = torch_forward(xt).float().cpu().numpy().transpose(0, 2, 3, 1)
          torch_run = lambda: _timed(lambda: torch_forward(xt))
        actual = np.asarray(compiled(state, xj)).astype(np.float32)
        diff = np.abs(actual - expected).max() / max(1.0, np.abs(expected).max())
        del expected, actual
        jax_runs, torch_runs = [], []
        for _ in range(args.repeats):
          jax_runs.append(_timed(lambda: compiled(state, xj).block_until_ready()))
          torch_runs.append(torch_run())
      (jax_s, jax_faults), (torch_s, torch_faults) = (sorted(runs)[len(runs) // 2]
                                                      for runs in (jax_runs, torch_runs))
      share = lambda s: 100 * flops / s / 1e9 / peak
      print(f'{variant:8}{size:>10}{1e3 * jax_s:9.0f}{1e3 * torch_s:10.0f}{jax_s / torch_s:7.2f}'
            f'{compile_s:10.1f}{flops / 1e9:7.0f}{share(jax_s):7.0f}%{share(torch_s):9.0f}%'
            f'{f"{jax_faults}/{torch_faults}":>16}{diff:10.1e}', flush=True)
    if child:
      child.close()


if __name__ == '__main__':
  main()
