"""IDRiD "A. Segmentation", read as the download unpacks (no renaming or conversion)."""
import tensorflow_datasets as tfds

from data_pipelines import records

TOP = 'A. Segmentation'
IMAGES = '1. Original Images'
GROUNDTRUTHS = '2. All Segmentation Groundtruths'
SPLITS = {'train': 'a. Training Set', 'test': 'b. Testing Set'}
# (folder, file suffix) of the EX, HE, SE, MA masks, in channel order, then the optic disc.
LESION_FOLDERS = (('3. Hard Exudates', 'EX'), ('2. Haemorrhages', 'HE'), ('4. Soft Exudates', 'SE'),
                  ('1. Microaneurysms', 'MA'))
OPTIC_DISC_FOLDER = ('5. Optic Disc', 'OD')

LAYOUT = f"""  {TOP}/
    {IMAGES}/{{a. Training Set, b. Testing Set}}/IDRiD_NN.jpg
    {GROUNDTRUTHS}/{{a. Training Set, b. Testing Set}}/
      1. Microaneurysms/IDRiD_NN_MA.tif   2. Haemorrhages/IDRiD_NN_HE.tif
      3. Hard Exudates/IDRiD_NN_EX.tif    4. Soft Exudates/IDRiD_NN_SE.tif
      5. Optic Disc/IDRiD_NN_OD.tif       (optional: stored if present, used by nothing)"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """IDRiD lesion segmentation: 54 train / 27 test fundus images at 4288x2848 with EX, HE, SE, MA masks."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original JPEGs and full-resolution masks as bit flags.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download "A. Segmentation.zip" of the Indian Diabetic Retinopathy Image Dataset from IEEE Dataport
  (https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid), unzip it and
  pass the folder that holds (or is) "{TOP}" as manual_dir:
{LAYOUT}
  A missing mask file means the image has no lesion of that type (SE: 26 train / 14 test files); the
  "5. Optic Disc" folder may be left out.
  """

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,  # examples in file-name order
        description=('Indian Diabetic Retinopathy Image Dataset, part A: lesion segmentation. '
                     'Images as the original JPEG bytes; masks (EX, HE, SE, MA, optic disc) binarised '
                     'on any RGB channel > 0 and stored losslessly as bit flags.'),
        features=records.features(optic_disc=True),
        homepage='https://idrid.grand-challenge.org/',
        citation=('@article{porwal2018idrid, title={Indian Diabetic Retinopathy Image Dataset (IDRiD): '
                  'A Database for Diabetic Retinopathy Screening Research}, author={Porwal, Prasanna '
                  'and others}, journal={Data}, volume={3}, number={3}, pages={25}, year={2018}}'),
    )

  def _split_generators(self, dl_manager):
    root = records.find_root(dl_manager.manual_dir, TOP, LAYOUT, required=(IMAGES, GROUNDTRUTHS))
    return {split: self._generate_examples(root, folder) for split, folder in SPLITS.items()}

  def _generate_examples(self, root, folder):
    image_dir = records.require_dir(root / IMAGES / folder, LAYOUT)
    mask_root = records.require_dir(root / GROUNDTRUTHS / folder, LAYOUT)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in ('.jpg', '.jpeg'))
    if not images:
      raise FileNotFoundError(f'No IDRiD_NN.jpg images in {image_dir}. Expected:\n{LAYOUT}')
    stems = {p.stem for p in images}
    mask_dirs = []
    for name, suffix in LESION_FOLDERS + (OPTIC_DISC_FOLDER,):
      mask_dir = mask_root / name
      if suffix != OPTIC_DISC_FOLDER[1] or mask_dir.is_dir():  # no optic disc folder: no OD masks
        records.require_dir(mask_dir, LAYOUT)
        records.check_masks_have_images(mask_dir, f'_{suffix}.tif', image_dir, stems)
      mask_dirs.append((mask_dir, suffix))
    for image in images:
      paths = [d / f'{image.stem}_{suffix}.tif' for d, suffix in mask_dirs]
      yield image.stem, records.make_example(image.stem, image, paths[:4], paths[4])
