"""M2MRF-HRNetV2-W48, variant c, on IDRID with the official recipe."""
from configs import common


def get_config():
  return common.get_config('idrid', 'c')
