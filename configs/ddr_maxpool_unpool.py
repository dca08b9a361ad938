"""HRNetV2-W48 with MaxPool / Unpooling (the pooling indices reused), on DDR (paper Table 2)."""
from configs import common


def get_config():
  config = common.get_config('ddr', 'base')
  config.model.down = 'maxpool'
  config.model.up = 'unpool'
  return config
