"""HRNetV2-W48 with StrideConv / Deconv, on DDR (paper Table 2)."""
from configs import common


def get_config():
  config = common.get_config('ddr', 'base')
  config.model.down = 'strideconv'
  config.model.up = 'deconv'
  return config
