"""HRNetV2-W48 with CARAFE (the CARAFE++ downsampler) / Bilinear, on IDRiD (paper Table 5)."""
from configs import common


def get_config():
  config = common.get_config('idrid', 'base')
  config.model.down = 'carafe'
  config.model.up = 'bilinear'
  return config
