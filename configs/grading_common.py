"""DR grading with SiAN (M2MRF-HRNetV2 side branch): the recipe shared by the grading configs.

Every grading config calls `get_config(dataset)` and may override fields. `task = 'grading'` sends
`m2mrf_jax.main` to `m2mrf_jax.grading.train`.
"""
import ml_collections

from configs import common

# dataset -> (segmenter normalisation of configs/common.py, steps, validation split)
DATASETS = {
    'ddr_grading': dict(segmenter='ddr', num_train_steps=20_000, val_split='validation'),
    'idrid_grading': dict(segmenter='idrid', num_train_steps=4_000, val_split=''),
}


def model_config(dataset='ddr_grading', num_classes=5, side_variant='c', side_width=48):
  """The `model` section: SiAN = Inception-v3 main branch + M2MRF-HRNetV2 side branch."""
  segmenter = common.DATASETS[DATASETS[dataset]['segmenter']]
  m = ml_collections.ConfigDict()
  m.num_classes = num_classes  # 5 ICDR grades (6 with DDR's ungradable kept)
  m.attention = 'conv'  # conv (paper Eq. 7) | maxpool (Eq. 6) | none (Inception-v3 alone)
  m.attention_channels = 64  # width of the first 3x3 conv of the attention block (paper: unstated)
  m.dropout = 0.5  # before the fc layer, as torchvision's Inception-v3
  m.freeze_side = True  # the paper: training both branches did not help grading
  m.dtype = 'float32'  # compute dtype of the main branch: float32 | bfloat16
  m.side = common.model_config(side_variant, side_width)  # the M2MRF-HRNetV2 segmenter
  m.side_mean = segmenter['mean']  # the segmenter's input normalisation (RGB)
  m.side_std = segmenter['std']
  return m


def data_config(dataset='ddr_grading'):
  """The `data` section."""
  d = ml_collections.ConfigDict()
  d.name = dataset  # ddr_grading | idrid_grading
  d.data_dir = '~/tensorflow_datasets'
  d.manual_dir = ''  # the download as it unpacks; built into data_dir on first use if set
  d.keep_ungradable = False  # DDR: keep grade 5 (then model.num_classes = 6)
  d.synthetic = False  # True: a synthetic download in workdir (demo, tests)
  d.synthetic_image_size = (256, 384)
  d.synthetic_num_train = 60
  d.synthetic_num_test = 30
  d.synthetic_seed = 0
  d.image_size = 896  # the paper's 896x896: long side resized to it, black padding to a square
  d.dihedral = True  # random rotations by 90 degrees and flips
  d.photometric = True  # brightness, contrast, saturation, hue (mmseg PhotoMetricDistortion)
  d.train_split = 'train'
  d.num_workers = 2
  d.prefetch = 2
  return d


def get_config(dataset='ddr_grading'):
  config = ml_collections.ConfigDict()
  config.task = 'grading'
  config.model = model_config(dataset)
  config.data = data_config(dataset)

  config.seed = 0
  config.batch_size = 16  # global
  config.num_train_steps = DATASETS[dataset]['num_train_steps']
  config.learning_rate = 0.001  # the paper's SGD: lr 0.001, momentum 0.95, weight decay 1e-4
  config.momentum = 0.95
  config.weight_decay = 1e-4
  config.min_learning_rate = 1e-5  # poly decay (the paper divides by 10 on validation plateaus)
  config.lr_power = 0.9

  config.main_pretrained = ''  # torchvision's inception_v3_google-0cc3c7bd.pth (ImageNet)
  config.side_checkpoint = ''  # orbax checkpoint of the segmenter (segmentation job or m2mrf_jax.convert)
  config.side_pretrained = ''  # or an official M2MRF .pth (converted on the fly)

  config.log_every_steps = 50
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 2
  config.val_split = DATASETS[dataset]['val_split']  # '' = no validation during training
  config.eval_every_steps = 2000  # validation kappa; the best checkpoint by kappa is kept
  config.eval_split = 'test'
  config.eval_batch_size = 8  # images per device
  return config
