"""M2MRF-HRNetV2 for tiny-lesion segmentation of fundus images, in JAX/Flax NNX."""
from m2mrf_jax import cpu_runtime
from m2mrf_jax import xla_options

__version__ = '0.1.0'  # setup.cfg reads it; model cards record it
xla_options.apply()  # before JAX's backend starts: see xla_options
cpu_runtime.apply()  # likewise: see cpu_runtime
