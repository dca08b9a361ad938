"""IDRiD part A (lesion segmentation) as a TFDS builder."""
from data_pipelines.idrid.idrid_dataset_builder import Builder
