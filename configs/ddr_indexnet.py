"""HRNetV2-W48 with IndexNet / IndexNet (index pooling, its indices reused to upsample), on DDR (paper Table 2)."""
from configs import common


def get_config():
  config = common.get_config('ddr', 'base')
  config.model.down = 'indexnet'
  config.model.up = 'indexnet'
  return config
