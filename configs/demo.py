"""Demo: M2MRF-C HRNetV2-W18 on synthetic IDRiD-like data, a few minutes on a 2-core CPU.

  python -m m2mrf_jax.main --config=configs/demo.py --workdir=/tmp/demo

Why it differs from the paper recipe (configs/idrid_c.py):
- W18 instead of W48, from scratch (no ImageNet checkpoint to download), small images and crops:
  a CPU step on a 960x1440 crop of W48 takes minutes.
- a learning rate of 1.0 (poly-decayed) for 120 steps instead of 0.01 for 40k: the official Dice
  gradient per pixel is tiny (its denominator sums every pixel), and at lr 0.05-0.1 the loss stays at
  ~0.99 for hundreds of steps; at 1.0 it falls to ~0.79 within 120 steps. No photometric distortion nor
  rescaling; batch 2 instead of 4 halves the step time (BN is still over the whole batch).
"""
from configs import common


def get_config():
  config = common.get_config('idrid', 'c')
  config.model.width = 18

  config.data.synthetic = True
  config.data.synthetic_image_size = (160, 240)
  config.data.synthetic_num_train = 8
  config.data.synthetic_num_test = 4
  config.data.img_scale = (240, 160)  # (long, short): the synthetic images as they are
  config.data.crop_size = (128, 128)
  config.data.ratio_range = (1.0, 1.0)
  config.data.photometric = False
  config.data.num_workers = 0  # threads only: the 2 cores are busy with the model

  config.batch_size = 2
  config.num_train_steps = 120
  config.learning_rate = 1.0
  config.log_every_steps = 10
  config.checkpoint_every_steps = 60
  config.keep_checkpoints = 1
  return config
