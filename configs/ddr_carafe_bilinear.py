"""HRNetV2-W48 with CARAFE (the CARAFE++ downsampler) / Bilinear, on DDR (paper Table 2)."""
from configs import common


def get_config():
  config = common.get_config('ddr', 'base')
  config.model.down = 'carafe'
  config.model.up = 'bilinear'
  return config
