"""M2MRF-HRNetV2-W48, variant b, on IDRID with the official recipe."""
from configs import common


def get_config():
  return common.get_config('idrid', 'b')
