"""HRNetV2-W48 with StrideConv / CARAFE, on IDRiD (paper Table 5)."""
from configs import common


def get_config():
  config = common.get_config('idrid', 'base')
  config.model.down = 'strideconv'
  config.model.up = 'carafe'
  return config
