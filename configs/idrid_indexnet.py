"""HRNetV2-W48 with IndexNet / IndexNet (index pooling, its indices reused to upsample), on IDRiD (paper Table 5)."""
from configs import common


def get_config():
  config = common.get_config('idrid', 'base')
  config.model.down = 'indexnet'
  config.model.up = 'indexnet'
  return config
