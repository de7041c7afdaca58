"""PrivNet (our reading of the paper's no-attention baseline): ResNet-50 through conv5_x,
global average pooling and the regressor, trained end to end."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "privnet"
  config.model.encoder.stages = 4
  config.model.encoder.trainable = True
  return config
