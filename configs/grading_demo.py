"""Demo: SiAN on synthetic photographs whose grade follows their lesions, a few minutes on 2 CPU cores.

  python -m m2mrf_jax.main --config=configs/grading_demo.py --workdir=/tmp/grading_demo

Why it differs from the paper recipe (configs/ddr_grading.py):
- 128x128 input instead of 896x896, the HRNetV2-W18 side branch instead of W48, no dropout: CPU time.
- Both branches from scratch (no ImageNet file or segmentation checkpoint to download), the side
  branch frozen as in the paper; with `--config.side_checkpoint=workdir/demo` (the segmentation
  demo's checkpoint, trained on the same synthetic lesions) it injects real lesion maps.
- a learning rate of 0.01 for 60 steps of 8 images instead of 0.001 for 20k steps of 16.
"""
from configs import grading_common


def get_config():
  config = grading_common.get_config('ddr_grading')
  config.model.side.width = 18
  config.model.dropout = 0.0

  config.data.synthetic = True
  config.data.synthetic_image_size = (160, 240)
  config.data.synthetic_num_train = 120
  config.data.synthetic_num_test = 50
  config.data.image_size = 128
  config.data.photometric = False
  config.data.num_workers = 0  # threads only: the 2 cores are busy with the model

  config.batch_size = 8
  config.num_train_steps = 60
  config.learning_rate = 0.01
  config.min_learning_rate = 1e-4
  config.log_every_steps = 10
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = 1000
  config.val_split = ''
  config.keep_checkpoints = 1
  config.eval_batch_size = 8
  return config
