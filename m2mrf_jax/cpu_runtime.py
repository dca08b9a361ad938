"""How XLA:CPU runs this package's programs: in the calling thread, on a heap that keeps its memory.

Each call of a compiled program allocates its temporaries afresh (about 0.6 GiB for the W18-C train step
at 256x256, batch 2). JAX's CPU client runs a call on a worker thread, whose glibc arena serves an
allocation that large with a fresh `mmap` and returns it with `munmap` at the end of the call; the next
call page-faults all of it in again, zeroed by the kernel: 157k page faults per W18 step, about a fifth
of its CPU time on 2 cores. `apply` makes the calls run inline in the caller's thread
(`jax_cpu_enable_async_dispatch`, read when JAX creates its CPU client: importing `m2mrf_jax` first is
enough, as for `xla_options`) and tells glibc's malloc to serve large blocks from the heap (M_MMAP_MAX
0) and never to trim freed heap (M_TRIM_THRESHOLD -1), so a call reuses the pages of the one before.
(The largest positive threshold, 2 GiB, is not enough: a process running the W48 forward at 956x1440
peaks at 3.1 GiB resident, and one such process (with trial Winograd convolutions, not kept) was seen
page-faulting 1.9 GiB in again at every call, 480k faults and 1-6 s of system time a call;
tests/test_cpu_runtime.py shows the trim at 2.25 GiB.) Measured on a 2-core CPU (jaxlib 0.10.2), W18-C
train step: 157k -> 0 page faults, 622-691 -> 518-544 ms, the PyTorch step beside it in the same process
748-798 -> 706-750 ms (it gets the same allocator). The numbers computed are the same (only where
buffers live changes). The costs: freed memory stays with the process (its resident size does not shrink
after a peak, and a process that frees and allocates many large NumPy arrays can peak higher:
benchmarks/evaluation.py's `counting` row, 1201 -> 1587-2016 MiB, while evaluation's own path,
`metrics.count_resized`, stays at 422-458 MiB), and on CPU the caller waits for each call (GPU and TPU
dispatch is unchanged). Without glibc (macOS, musl), only the first part applies.
$M2MRF_JAX_CPU_RUNTIME=0 in the environment leaves both as JAX and glibc have them ("off" in the
benchmarks' headers).
"""
import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
OPT_OUT = 'M2MRF_JAX_CPU_RUNTIME'
NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: glibc keeps all freed heap (mallopt(3))


def applies(environ=os.environ) -> bool:
  """False where the environment opts out ($M2MRF_JAX_CPU_RUNTIME=0)."""
  return environ.get(OPT_OUT, '1') != '0'


def describe(environ=os.environ) -> str:
  """'cpu_runtime on' or 'cpu_runtime off': the benchmarks' header."""
  return f'cpu_runtime {"on" if applies(environ) else "off"}'


def apply() -> None:
  """Inline CPU dispatch, and glibc's malloc keeping large blocks (where the C library has mallopt)."""
  if not applies():
    return
  import jax  # pylint: disable=g-import-not-at-top (after xla_options has set XLA_FLAGS)
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)  # the process's C library
  if mallopt is not None:
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
