"""The BasicBlock 3x3 convolutions of HRNetV2, JAX (XLA) against PyTorch, one process: the per-op bound.

  python benchmarks/conv3x3.py --width=48 --size=384x576 [--backward] [--threads=1]

HRNetV2's branches run 3x3 stride-1 convs C -> C at H/4 x W/4 (C = W), H/8 (2W), H/16 (4W), H/32 (8W);
for each shape: milliseconds of `lax.conv_general_dilated` (NHWC / HWIO, jitted) and of torch
`F.conv2d` (NCHW, no_grad), alternated, medians; GFLOP/s of each as a share of the measured float32
matmul peak; how many such convs the network runs (2 per BasicBlock, 4 blocks per branch and module).
With --backward, the forward + backward of sum(conv(x) * g) w.r.t. input and kernel instead (3x the FLOPs).
XLA_FLAGS are read as usual, so the same command compares XLA:CPU options. Importing `m2mrf_jax` sets
its XLA option and `cpu_runtime` for both sides, as the package runs ($M2MRF_JAX_CPU_RUNTIME=0: off).
"""
import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from benchmarks import compiled  # pylint: disable=g-import-not-at-top,wrong-import-position
from m2mrf_jax import cpu_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

MODULES = (8, 8, 7, 3)  # HRModules with each branch: stages 2-4 have (1, 4, 3) modules


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=int, default=48)
  parser.add_argument('--size', default='384x576', help='HxW input of the network')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--backward', action='store_true')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  n = compiled.matmul_size()
  at = torch.ones(n, n)
  at @ at
  peak = max(compiled.matmul_rate(jnp.float32, 3),
             2 * n**3 / compiled.median_seconds(lambda: at @ at, 3)) / 1e9
  h, w = (int(v) for v in args.size.split('x'))
  print(f'HRNetV2-W{args.width} {h}x{w}, batch {args.batch}, 3x3 convs '
        f'{"forward + backward" if args.backward else "forward"}; torch {torch.get_num_threads()} '
        f'threads; matmul peak {peak:.0f} GFLOP/s; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; '
        f'{cpu_runtime.describe()}; '
        f'load average {os.getloadavg()[0]:.1f}')
  print(f'{"branch":>6}{"shape":>16}{"convs":>6}{"JAX ms":>9}{"torch ms":>10}{"ratio":>7}'
        f'{"JAX %pk":>8}{"torch %pk":>10}', flush=True)
  total_jax = total_torch = 0.0
  for k, modules in enumerate(MODULES):
    c, hb, wb = args.width << k, -(-h // (4 << k)), -(-w // (4 << k))
    rng = np.random.default_rng(k)
    x = rng.standard_normal((args.batch, hb, wb, c)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, c, c)) * 0.05).astype(np.float32)
    g = rng.standard_normal((args.batch, hb, wb, c)).astype(np.float32)
    conv = lambda x, k_: jax.lax.conv_general_dilated(x, k_, (1, 1), [(1, 1), (1, 1)],
                                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    xj, kj, gj = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(g)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    kt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    gt = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
    if args.backward:
      step = jax.jit(jax.grad(lambda x, k_: jnp.sum(conv(x, k_) * gj), argnums=(0, 1)))
      run_jax = lambda: jax.block_until_ready(step(xj, kj))
      xt.requires_grad_(True)
      kt.requires_grad_(True)

      def run_torch():
        xt.grad = kt.grad = None
        (torch.nn.functional.conv2d(xt, kt, padding=1) * gt).sum().backward()
    else:
      step = jax.jit(conv)
      run_jax = lambda: step(xj, kj).block_until_ready()

      def run_torch():
        with torch.no_grad():
          torch.nn.functional.conv2d(xt, kt, padding=1)
    run_jax()
    run_torch()
    jax_times, torch_times = [], []
    for _ in range(args.repeats):
      jax_times.append(compiled.seconds(run_jax))
      torch_times.append(compiled.seconds(run_torch))
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    flops = 2 * args.batch * hb * wb * 9 * c * c * (3 if args.backward else 1)
    count = 2 * 4 * modules
    total_jax += count * jax_s
    total_torch += count * torch_s
    pk = lambda s: 100 * flops / s / 1e9 / peak
    print(f'{k:6}{f"{hb}x{wb}x{c}":>16}{count:6}{1e3 * jax_s:9.1f}{1e3 * torch_s:10.1f}'
          f'{jax_s / torch_s:7.2f}{pk(jax_s):7.0f}%{pk(torch_s):9.0f}%', flush=True)
  print(f'{"all":>6}{"":>16}{2 * 4 * sum(MODULES):6}{1e3 * total_jax:9.0f}{1e3 * total_torch:10.0f}'
        f'{total_jax / total_torch:7.2f}')


if __name__ == '__main__':
  main()
