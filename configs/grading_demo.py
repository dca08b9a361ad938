"""Demo: SiAN on synthetic photographs whose grade follows their lesions, a few minutes on 2 CPU cores.

  python -m m2mrf_jax.main --config=configs/grading_demo.py --workdir=/tmp/grading_demo

Why it differs from the paper recipe (configs/ddr_grading.py):
- 128x128 input instead of 896x896, the HRNetV2-W18 side branch instead of W48, no dropout: CPU time.
- Both branches from scratch (no ImageNet file or segmentation checkpoint to download), the side
  branch frozen as in the paper; with `--config.side_checkpoint=workdir/demo` (the segmentation
  demo's checkpoint, trained on the same synthetic lesions) it injects real lesion maps.
- a learning rate of 0.01 for 60 steps of 8 images instead of 0.001 for 20k steps of 16.

Measured on the shared 2-core machine (load average ~13, so wall times are inflated several-fold):
13 min in all (data 1 s, model build 33 s, step compilation ~3.5 min, 60 steps at 1.3-1.8 images/s,
evaluation of the 42 gradable test photographs with its compilation 3 min). Test split after the 60
steps: accuracy 40.5%, quadratic kappa 0.729, macro F1 34.9%, referable-DR AUC 0.884; untrained
(--config.num_train_steps=0): 19.0%, 0.000, 6.4%, 0.500. From scratch and in 480 images seen, the
run-to-run spread is large.
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
