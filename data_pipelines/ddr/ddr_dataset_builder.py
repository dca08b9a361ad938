"""DDR lesion segmentation, read as the download unpacks (no renaming or conversion)."""
import tensorflow_datasets as tfds

from data_pipelines import codecs
from data_pipelines import records

TOP = 'lesion_segmentation'
SPLITS = {'train': 'train', 'validation': 'valid', 'test': 'test'}
MASK_FOLDERS = ('label', 'segmentation label')  # the real valid split uses the second name

LAYOUT = f"""  DDR-dataset/{TOP}/
    {{train, valid, test}}/image/<name>.jpg
    {{train, test}}/label/{{EX, HE, MA, SE}}/<name>.tif
    valid/segmentation label/{{EX, HE, MA, SE}}/<name>.tif   (or label/)"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """DDR lesion segmentation: 383 / 149 / 225 fundus images of varying size with EX, HE, SE, MA masks."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original JPEGs and full-resolution masks as bit flags.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download the split zip of https://github.com/nkicsl/DDR-dataset (Baidu or Google Drive), join and
  unzip it (cat DDR-dataset.zip.0* > DDR-dataset.zip; unzip DDR-dataset.zip) and pass the folder that
  holds (or is) "{TOP}" as manual_dir:
{LAYOUT}
  Masks are single-channel TIFFs with lesions at 255; a missing file means an empty mask.
  """

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,  # examples in file-name order
        description=('DDR (OIA-DDR) lesion segmentation. Images as the original JPEG bytes; masks '
                     '(EX, HE, SE, MA) binarised at > 0 and stored losslessly as bit flags.'),
        features=records.features(optic_disc=False),
        homepage='https://github.com/nkicsl/DDR-dataset',
        citation=('@article{li2019ddr, title={Diagnostic assessment of deep learning algorithms for '
                  'diabetic retinopathy screening}, author={Li, Tao and Gao, Yingqi and Wang, Kai and '
                  'Guo, Song and Liu, Hanruo and Kang, Hong}, journal={Information Sciences}, '
                  'volume={501}, pages={511--522}, year={2019}}'),
    )

  def _split_generators(self, dl_manager):
    root = records.find_root(dl_manager.manual_dir, TOP, LAYOUT, required=tuple(SPLITS.values()))
    return {split: self._generate_examples(root / folder) for split, folder in SPLITS.items()}

  def _generate_examples(self, split_dir):
    image_dir = records.require_dir(split_dir / 'image', LAYOUT)
    mask_root = next((split_dir / m for m in MASK_FOLDERS if (split_dir / m).is_dir()), None)
    if mask_root is None:
      records.require_dir(split_dir / MASK_FOLDERS[0], LAYOUT)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in ('.jpg', '.jpeg'))
    if not images:
      raise FileNotFoundError(f'No <name>.jpg images in {image_dir}. Expected:\n{LAYOUT}')
    stems = {p.stem for p in images}
    mask_dirs = [records.require_dir(mask_root / lesion, LAYOUT) for lesion in codecs.LESIONS]
    for mask_dir in mask_dirs:
      records.check_masks_have_images(mask_dir, '.tif', image_dir, stems)
    for image in images:
      paths = [d / f'{image.stem}.tif' for d in mask_dirs]
      yield image.stem, records.make_example(image.stem, image, paths)
