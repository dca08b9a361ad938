"""SiAN on DDR grades (0..4; ungradable dropped), M2MRF-HRNetV2-W48-C side branch, 896x896 input.

  python -m m2mrf_jax.main --config=configs/ddr_grading.py --workdir=runs/ddr_grading \
      --config.main_pretrained=inception_v3_google-0cc3c7bd.pth --config.side_checkpoint=runs/ddr_c
"""
from configs import grading_common


def get_config():
  return grading_common.get_config('ddr_grading')
