"""How this package compiles: one XLA option, set before JAX starts its backend, and the disk cache.

`xla_cpu_flatten_after_fusion` (an XLA:CPU backend option): XLA inlines the functions a program calls
(here each `jax.nn.relu` and `jnp.pad`: 458 calls in a W18 train step) after fusing, not before, so
that no fusion spans a call. By default XLA:CPU inlines first and then builds fusions that recompute
BatchNorm outputs inside the relayouts feeding the convolutions' kernel gradients. Measured on a 2-core
CPU (jaxlib 0.10.2), W18-C train step at 256x256, batch 2: compile 77 -> 30 s, step 1352 -> 712 ms; the
W48 forward: see the README's Performance section. Gradients are not bit-identical (max difference
1.6e-8) and as far from a float64 PyTorch reference as before (relative L2 1.12e-2 either way; PyTorch
float32 7.2e-3). The option is part of XLA's `CPU_OPT_PRESET_FAST_COMPILE` preset, whose other change
(a plain 1 / sqrt for rsqrt) doubles that gradient error, so it is set alone. It is an XLA:CPU option;
whether the GPU and TPU compilers ignore it silently has not been run.

XLA reads XLA_FLAGS once, when JAX creates its first backend: importing `m2mrf_jax` before any JAX
computation is enough (every entry point does); imported later, it warns (`backend_started`) that
neither this option nor `cpu_runtime`'s inline dispatch (read with them) applies to the process (its
malloc settings still do). A user's own `--xla_backend_extra_options` is kept as given, without this
option.

`use_compilation_cache`: the command-line tools (`main`, `predict`, `--jit_cache_dir`) keep JAX's
persistent compilation cache, so that a second run of the same shapes loads what XLA compiled.
Measured on the 2-core CPU (jaxlib 0.10.2): the W48-C forward at 384x576 compiles in 11.1 s, loads
from the cache in 4.1 s; the W18-C train step (256x256, batch 2) loads in 60.0 s against 60.6 s
compiled: XLA:CPU's loading of that executable costs as much as compiling it.
"""
import os
import sys

FLAG = '--xla_backend_extra_options'
CACHE_DIR = os.path.join('~', '.cache', 'm2mrf_jax', 'jit')  # the tools' default `--jit_cache_dir`
CACHE_HELP = ("JAX's persistent compilation cache: programs whose compile took a second or more are "
              "kept here and loaded by later runs of the same shapes ('' = none; "
              "$JAX_COMPILATION_CACHE_DIR, when set, wins).")
OPTION = f'{FLAG}=xla_cpu_flatten_after_fusion'


def with_option(flags: str | None) -> str:
  """XLA_FLAGS `flags` with OPTION appended, unless they already set FLAG."""
  flags = (flags or '').strip()
  if FLAG in flags:
    return flags
  return f'{flags} {OPTION}'.strip()


def apply(environ=os.environ) -> None:
  """Sets `environ['XLA_FLAGS']` to `with_option` of its value."""
  environ['XLA_FLAGS'] = with_option(environ.get('XLA_FLAGS'))


def backend_started() -> bool:
  """Whether JAX has already created its backends, so that XLA_FLAGS (and JAX's CPU client settings)
  were read without this package's: False until the first JAX computation."""
  if 'jax' not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top (no public query)
  started = getattr(xla_bridge, 'backends_are_initialized', None)
  return bool(started and started())


def use_compilation_cache(directory: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory` ('' = none); returns the one in use.

  A directory already set (by $JAX_COMPILATION_CACHE_DIR or the user's `jax.config`) is kept. Call it
  before the first compile: JAX opens its cache once, at the first compile.
  """
  import jax  # pylint: disable=g-import-not-at-top (this module runs before JAX's backend starts)
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  if not directory:
    return None
  directory = os.path.expanduser(directory)
  jax.config.update('jax_compilation_cache_dir', directory)
  return directory
