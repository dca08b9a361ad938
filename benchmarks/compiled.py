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


def median_seconds(fn, repeats):
  """Median wall time of `repeats` calls of `fn` (after the caller's warm-up)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
