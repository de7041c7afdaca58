"""PrivAttNet as in the paper: frozen ImageNet ResNet-50 to conv4_x, 3 attention-LSTM steps."""

from configs import default


def get_config():
  return default.get_config()
