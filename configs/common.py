"""The official M2MRF recipe (configs/m2mrf/fcn_hr48-M2MRF-*_{40k_idrid,60k_ddr}_bdice.py), shared.

Every dataset/variant file calls `get_config(dataset, variant)` and may override fields. The config
is locked: setting a key it does not have raises (with "Did you mean ..."), so does `--config.KEY=`.
"""
import ml_collections

# Per-dataset constants of the official configs (configs/_base_/datasets/{idrid,ddr}.py).
DATASETS = {
    'idrid': dict(
        img_scale=(1440, 960),  # (long, short) keep-ratio box, as mmcv: 4288x2848 -> 1440x956.
        crop_size=(960, 1440),  # (h, w)
        mean=(116.513, 56.437, 16.309),  # RGB
        std=(80.206, 41.232, 13.293),
        num_train_steps=40_000,
        eval_split='test',
    ),
    'ddr': dict(
        img_scale=(1024, 1024),
        crop_size=(1024, 1024),
        mean=(81.205, 50.636, 21.216),
        std=(76.252, 48.798, 21.625),
        num_train_steps=60_000,
        eval_split='test',
    ),
}


def model_config(variant='c', width=48):
  """The `model` section: fully describes the network."""
  m = ml_collections.ConfigDict()
  m.variant = variant  # base | a | b | c | d: the released models (converter, checkpoints)
  # Resampling operators, '' = the variant's (see m2mrf_jax/hrnet.py Resampling, README table):
  m.down = ''  # strideconv | maxpool | lip | carafe | indexnet | a2u | m2mrf_onestep | m2mrf_cascade
  m.up = ''  # bilinear | unpool | deconv | carafe | indexnet | a2u | m2mrf_onestep | m2mrf_cascade
  m.width = width  # HRNetV2 width: 18, 32 or 48
  m.num_classes = 4  # EX, HE, SE, MA; sigmoid per class, no background channel
  m.patch_size = 8  # S: M2MRF patch size (official m2mrf_patch_size=(8, 8))
  m.encode_rate = 4  # r: channels C -> C/r before reassembly
  m.fc_rate = 64  # alpha: hidden width S^2 C/(alpha r)
  m.dtype = 'float32'  # compute dtype: float32 | bfloat16 (parameters stay float32)
  m.remat = False  # rematerialise the backbone stages to save memory
  return m


def data_config(dataset='idrid'):
  """The `data` section: which dataset and how to feed it (official train/test pipelines)."""
  d = ml_collections.ConfigDict(DATASETS[dataset])
  d.name = dataset
  d.data_dir = '~/tensorflow_datasets'  # where the TFDS array_record files live
  d.manual_dir = ''  # the download as it unpacks; built into data_dir on first use if set
  d.synthetic = False  # True: write a synthetic download into workdir and build it (demo, tests)
  d.synthetic_image_size = (320, 480)  # (h, w) of the synthetic images
  d.synthetic_num_train = 8  # synthetic train images
  d.synthetic_num_test = 4  # synthetic images of each other split (test; DDR validation too)
  d.synthetic_seed = 0
  d.ratio_range = (0.5, 2.0)  # random rescale of img_scale
  d.dihedral = True  # the official offline x6 augmentation, done on the fly
  d.photometric = True  # mmseg PhotoMetricDistortion with its defaults
  # Opt-in, not the official input: decode JPEGs at 1/2-1/8 scale (DCT) where the rescaled image allows
  # and resize with Pillow's antialiased bilinear (README, "Exactly as the official code").
  d.reduced_decode = False
  d.label_mode = 'exclusive'  # exclusive (official merge, later of EX,HE,SE,MA wins) | multilabel
  d.train_split = 'train'
  d.num_workers = 2  # grain worker processes per host
  d.prefetch = 2
  return d


def get_config(dataset='idrid', variant='c'):
  """The whole recipe for one dataset and variant."""
  config = ml_collections.ConfigDict()
  config.model = model_config(variant)
  config.data = data_config(dataset)

  config.seed = 0
  config.batch_size = 4  # global: 1 image x 4 GPUs with SyncBN in the official runs
  config.grad_accum_steps = 1  # e.g. 4 with batch_size 4 = one image per micro-step
  config.num_train_steps = config.data.num_train_steps
  config.learning_rate = 0.01
  config.min_learning_rate = 1e-4
  config.lr_power = 0.9  # poly: (lr - min_lr) * (1 - step / num_steps)^power + min_lr
  config.momentum = 0.9
  config.weight_decay = 5e-4  # on every parameter, BN and biases included, as the official SGD
  config.loss = 'dice'  # dice (official BinaryLoss) | dual (L-Net: lambda pixel + (1-lambda) image)
  config.dual_lambda = 0.8
  config.pretrained = ''  # ImageNet HRNet-W48 .pth (MSRA hrnetv2_w48-d2186c55.pth); '' = from scratch

  config.log_every_steps = 50
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 3
  config.eval_split = config.data.eval_split
  config.eval_batch_size = 1  # images per device at evaluation (whole-image inference)
  config.aupr_fine_thresholds = 1001  # the extra, finer AUPR column
  config.num_pictures = 4  # first test images drawn side by side in workdir/pictures/ (0: none)
  config.tta = 'none'  # evaluation: none (official) | flip (also the left-right mirror, logits averaged)
  config.lock()
  return config
