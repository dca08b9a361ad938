"""Shared by the benchmarks: the jitted eval forward of a model, its XLA FLOPs, and median timings."""
import statistics
import time

from flax import nnx
import jax


def compile_forward(model, x):
  """(run, compile seconds, FLOPs per image) for the jitted forward of `model` on `x`'s shape;
  `run()` does one forward and blocks until it is done."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  start = time.perf_counter()
  compiled = forward.lower(state, x).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = cost.get('flops', float('nan')) / x.shape[0]
  return lambda: compiled(state, x).block_until_ready(), compile_s, flops


def matmul_size():
  """The side of the square matmul that measures a device's peak: 2048 on CPU, else 8192."""
  return 2048 if jax.devices()[0].platform == 'cpu' else 8192


def matmul_rate(dtype, repeats=5):
  """FLOP/s of a jitted `matmul_size()`-square matmul in `dtype` on the first device (median)."""
  n = matmul_size()
  a = jax.numpy.ones((n, n), dtype)
  mm = jax.jit(lambda a: a @ a)
  run = lambda: mm(a).block_until_ready()
  run()
  return 2 * n**3 / median_seconds(run, repeats)


def seconds(fn):
  """Wall time of one call of `fn`."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def median_seconds(fn, repeats):
  """Median wall time of `repeats` calls of `fn` (after the caller's warm-up)."""
  return statistics.median(seconds(fn) for _ in range(repeats))
