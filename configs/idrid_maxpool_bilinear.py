"""HRNetV2-W48 with MaxPool / Bilinear, on IDRiD (paper Table 5)."""
from configs import common


def get_config():
  config = common.get_config('idrid', 'base')
  config.model.down = 'maxpool'
  config.model.up = 'bilinear'
  return config
