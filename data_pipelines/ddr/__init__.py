"""DDR lesion segmentation as a TFDS builder."""
from data_pipelines.ddr.ddr_dataset_builder import Builder
