"""M2MRF-HRNetV2 for tiny-lesion segmentation of fundus images, in JAX/Flax NNX."""
