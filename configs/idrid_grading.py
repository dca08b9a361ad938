"""SiAN on IDRiD part B grades (0..4), M2MRF-HRNetV2-W48-C side branch, 896x896 input.

  python -m m2mrf_jax.main --config=configs/idrid_grading.py --workdir=runs/idrid_grading \
      --config.main_pretrained=inception_v3_google-0cc3c7bd.pth --config.side_checkpoint=runs/idrid_c
"""
from configs import grading_common


def get_config():
  return grading_common.get_config('idrid_grading')
