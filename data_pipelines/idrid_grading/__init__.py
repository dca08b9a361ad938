"""IDRiD part B (disease grading) as a TFDS builder."""
from data_pipelines.idrid_grading.idrid_grading_dataset_builder import Builder
