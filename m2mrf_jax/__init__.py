"""M2MRF-HRNetV2 for tiny-lesion segmentation of fundus images, in JAX/Flax NNX."""

__version__ = '0.1.0'  # setup.cfg reads it; model cards record it
