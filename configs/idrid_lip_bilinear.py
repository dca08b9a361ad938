"""HRNetV2-W48 with LIP / Bilinear, on IDRiD (paper Table 5)."""
from configs import common


def get_config():
  config = common.get_config('idrid', 'base')
  config.model.down = 'lip'
  config.model.up = 'bilinear'
  return config
