"""HRNetV2-W48 with A2U / A2U (affinity-aware down/upsampling kernels from one block), on DDR (paper Table 2)."""
from configs import common


def get_config():
  config = common.get_config('ddr', 'base')
  config.model.down = 'a2u'
  config.model.up = 'a2u'
  return config
