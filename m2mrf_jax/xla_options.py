"""The XLA option this package compiles with, put into XLA_FLAGS before JAX starts its backend.

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
computation is enough (every entry point does). A user's own `--xla_backend_extra_options` is kept
as given, without this option.
"""
import os

FLAG = '--xla_backend_extra_options'
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
