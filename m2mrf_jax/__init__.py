"""M2MRF-HRNetV2 for tiny-lesion segmentation of fundus images, in JAX/Flax NNX."""
import warnings

from m2mrf_jax import cpu_runtime
from m2mrf_jax import xla_options

__version__ = '0.1.0'  # setup.cfg reads it; model cards record it
if xla_options.backend_started():
  warnings.warn('m2mrf_jax was imported after JAX started its backend: its XLA option '
                f'({xla_options.OPTION}) and cpu_runtime\'s inline dispatch do not apply to this '
                'process (the W18 train step is then about 2x slower on CPU). Import m2mrf_jax '
                'before any JAX computation.', RuntimeWarning, stacklevel=2)
xla_options.apply()  # before JAX's backend starts: see xla_options
cpu_runtime.apply()  # likewise: see cpu_runtime
