"""DDR DR grading as a TFDS builder."""
from data_pipelines.ddr_grading.ddr_grading_dataset_builder import Builder
