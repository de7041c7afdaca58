"""The laptop demo: a tiny encoder trained from scratch on the synthetic VISPR-format data.

`python run.py --config=configs/demo.py --workdir=/tmp/demo` generates the data
(cached), builds it with the real VISPR builder, trains, evaluates on the test
split. `--config=configs/demo.py:privnet` runs the no-attention head instead.
"""

from configs import default


def get_config(variant="privattnet"):
  config = default.get_config()
  config.image_size = 128  # An 8x8 attention grid.
  config.batch_size = 32
  config.num_epochs = 12
  config.log_every_steps = 20
  config.keep_checkpoints = 2
  config.data.resize_size = 144
  config.data.crop_scale = (0.5, 1.0)  # Planted objects are small: keep them in most crops.
  config.data.synthetic.num_train = 2000
  config.data.synthetic.num_val = 300
  config.data.synthetic.num_test = 500
  config.model.name = variant
  config.model.encoder.depth = 0  # The tiny test encoder.
  config.model.encoder.width = 16
  config.model.encoder.stages = 4 if variant in ("privnet", "ap_pr", "pr_cnn") else 3
  config.model.encoder.trainable = True  # No pretrained weights here: learn the encoder.
  config.model.attention.hidden_size = 128
  config.model.attention.regressor_hidden = 64
  config.model.attention.feature_dropout = 0.2
  config.model.attention.dropout = 0.1
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 50
  return config
