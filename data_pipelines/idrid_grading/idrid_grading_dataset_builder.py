"""IDRiD "B. Disease Grading", read as the download unpacks (images and the two label CSV files)."""
import csv
import io

from absl import logging
import tensorflow_datasets as tfds

from data_pipelines import grading_records
from data_pipelines import records

TOP = 'B. Disease Grading'
IMAGES = '1. Original Images'
GROUNDTRUTHS = '2. Groundtruths'
SPLITS = {
    'train': ('a. Training Set', 'a. IDRiD_Disease Grading_Training Labels.csv'),
    'test': ('b. Testing Set', 'b. IDRiD_Disease Grading_Testing Labels.csv'),
}
COLUMNS = ('image name', 'retinopathy grade', 'risk of macular edema')  # compared stripped, lower case

LAYOUT = f"""  {TOP}/
    {IMAGES}/{{a. Training Set, b. Testing Set}}/IDRiD_NNN.jpg
    {GROUNDTRUTHS}/a. IDRiD_Disease Grading_Training Labels.csv
    {GROUNDTRUTHS}/b. IDRiD_Disease Grading_Testing Labels.csv
      columns "Image name,Retinopathy grade,Risk of macular edema" (trailing empty columns ignored)"""


def read_labels(path):
  """Rows (line number, image stem, DR grade, macular edema risk) of an IDRiD grading CSV."""
  rows = list(csv.reader(io.StringIO(path.read_text(encoding='utf-8-sig'))))
  header = [h.strip().lower() for h in rows[0]] if rows else []
  missing = [c for c in COLUMNS if c not in header]
  if missing:
    raise ValueError(f'{path}:1: the header lacks the columns {missing}; expected '
                     f'"Image name,Retinopathy grade,Risk of macular edema", got {rows[:1]}')
  index = [header.index(c) for c in COLUMNS]
  out = []
  for number, row in enumerate(rows[1:], start=2):
    if not any(field.strip() for field in row):
      continue  # the training file ends with empty rows
    where = f'{path}:{number}'
    if len(row) <= max(index):
      raise ValueError(f'{where}: expected {len(header)} columns, got {row}')
    name, grade, edema = (row[i].strip() for i in index)
    stem = name[:-len('.jpg')] if name.lower().endswith('.jpg') else name
    out.append((where, stem, grading_records.parse_grade(grade, where, range(5)),
                grading_records.parse_grade(edema, where, range(3))))
  return out


class Builder(tfds.core.GeneratorBasedBuilder):
  """IDRiD disease grading: 413 train / 103 test photographs (4288x2848), DR grade and DME risk."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original JPEGs with DR grade and risk of macular edema.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download "B. Disease Grading.zip" of the Indian Diabetic Retinopathy Image Dataset from IEEE Dataport
  (https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid), unzip it and
  pass the folder that holds (or is) "{TOP}" as manual_dir:
{LAYOUT}
  """

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,  # examples in label-file order
        description=('Indian Diabetic Retinopathy Image Dataset, part B: disease grading. Images as '
                     'the original JPEG bytes; DR grade 0..4 and risk of macular edema 0..2.'),
        features=grading_records.features(macular_edema=True),
        homepage='https://idrid.grand-challenge.org/',
        citation=('@article{porwal2020idrid, title={IDRiD: Diabetic Retinopathy - Segmentation and '
                  'Grading Challenge}, author={Porwal, Prasanna and others}, journal={Medical Image '
                  'Analysis}, volume={59}, pages={101561}, year={2020}}'),
    )

  def _split_generators(self, dl_manager):
    root = records.find_root(dl_manager.manual_dir, TOP, LAYOUT)
    return {split: self._generate_examples(root, *files) for split, files in SPLITS.items()}

  def _generate_examples(self, root, folder, label_name):
    image_dir = records.require_dir(root / IMAGES / folder, LAYOUT)
    label_file = root / GROUNDTRUTHS / label_name
    if not label_file.exists():
      raise FileNotFoundError(f'Missing label file {label_file}. Expected:\n{LAYOUT}')
    seen = {}
    for where, stem, grade, edema in read_labels(label_file):
      grading_records.check_new(stem, seen, where)
      image = grading_records.require_image(image_dir / f'{stem}.jpg', where)
      yield stem, grading_records.make_example(stem, image, grade, edema)
    unlisted = sorted(p.name for p in image_dir.glob('*.jpg') if p.stem not in seen)
    if unlisted:
      logging.warning('%d images in %s have no row in %s and were not read, e.g. %s',
                      len(unlisted), image_dir, label_file, unlisted[:3])
