"""DDR "DR_grading", read as the download unpacks: {train,valid,test}/*.jpg and {train,valid,test}.txt."""
from absl import logging
import tensorflow_datasets as tfds

from data_pipelines import grading_records
from data_pipelines import records

TOP = 'DR_grading'
SPLITS = {'train': 'train', 'validation': 'valid', 'test': 'test'}

LAYOUT = f"""  DDR-dataset/{TOP}/
    train/<name>.jpg  valid/<name>.jpg  test/<name>.jpg
    train.txt  valid.txt  test.txt      one "<name>.jpg <grade>" per line, grade 0..4 or 5 (ungradable)"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """DDR DR grading: 13,673 fundus photographs of many cameras, grades 0..4 and 5 = ungradable."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original JPEGs with their grade.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='gradable', description='Grades 0..4; ungradable (5) dropped.'),
      tfds.core.BuilderConfig(name='with_ungradable', description='Grades 0..5, 5 = ungradable.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download the split zip of https://github.com/nkicsl/DDR-dataset (Baidu or Google Drive), join and
  unzip it (cat DDR-dataset.zip.0* > DDR-dataset.zip; unzip DDR-dataset.zip) and pass the folder that
  holds (or is) "{TOP}" as manual_dir:
{LAYOUT}
  """

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,  # examples in label-file order
        description=('DDR (OIA-DDR) DR grading. Images as the original JPEG bytes; grades as listed '
                     'in {train,valid,test}.txt.'),
        features=grading_records.features(),
        homepage='https://github.com/nkicsl/DDR-dataset',
        citation=('@article{li2019ddr, title={Diagnostic assessment of deep learning algorithms for '
                  'diabetic retinopathy screening}, author={Li, Tao and Gao, Yingqi and Wang, Kai and '
                  'Guo, Song and Liu, Hanruo and Kang, Hong}, journal={Information Sciences}, '
                  'volume={501}, pages={511--522}, year={2019}}'),
    )

  def _split_generators(self, dl_manager):
    root = records.find_root(dl_manager.manual_dir, TOP, LAYOUT)
    keep = self.builder_config.name == 'with_ungradable'
    return {split: self._generate_examples(root, folder, keep) for split, folder in SPLITS.items()}

  def _generate_examples(self, root, folder, keep_ungradable):
    image_dir = records.require_dir(root / folder, LAYOUT)
    label_file = root / f'{folder}.txt'
    if not label_file.exists():
      raise FileNotFoundError(f'Missing label file {label_file}. Expected:\n{LAYOUT}')
    seen, dropped = {}, 0
    for number, line in enumerate(label_file.read_text().splitlines(), start=1):
      if not line.strip():
        continue
      where = f'{label_file}:{number}'
      fields = line.split()
      if len(fields) != 2:
        raise ValueError(f'{where}: expected "<name>.jpg <grade>", got {line.strip()!r}')
      name, grade_text = fields
      stem = name[:-len('.jpg')] if name.lower().endswith('.jpg') else name
      grading_records.check_new(stem, seen, where)
      grade = grading_records.parse_grade(grade_text, where, range(len(grading_records.GRADE_NAMES)))
      image = grading_records.require_image(image_dir / f'{stem}.jpg', where)
      if grade == grading_records.UNGRADABLE and not keep_ungradable:
        dropped += 1
        continue
      yield stem, grading_records.make_example(stem, image, grade)
    unlisted = sorted(p.name for p in image_dir.glob('*.jpg') if p.stem not in seen)
    if unlisted:
      logging.warning('%d images in %s are not listed in %s and were not read, e.g. %s',
                      len(unlisted), image_dir, label_file, unlisted[:3])
    if dropped:
      logging.info('%s: %d ungradable images (grade 5) dropped (builder config with_ungradable '
                   'keeps them).', label_file, dropped)
