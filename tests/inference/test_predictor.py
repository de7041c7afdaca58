"""predictor: the fixed-batch Predictor, the config check against a checkpoint, and the predictor JSON."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privattnet_jax.data import attributes
from privattnet_jax.data import input_pipeline
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.models import scoring
from tests.conftest import make_tiny_config


def test_a_short_batch_is_padded_to_the_compiled_size_and_cut_back():
  calls = []

  def infer(images, mask):
    calls.append((images.copy(), mask.copy()))
    return {"score": images[:, 0, 0, :1] + 1, "attention": np.ones((len(images), 2, 4))}

  model = predictor_lib.Predictor({"image_size": 8}, 4, infer)
  images = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
  outputs = model(images)
  ((padded, mask),) = calls
  assert padded.shape == (4, 8, 8, 3) and padded.dtype == np.float32
  np.testing.assert_array_equal(padded[:3], images)
  np.testing.assert_array_equal(padded[3], 0.0)
  np.testing.assert_array_equal(mask, [1, 1, 1, 0])
  np.testing.assert_array_equal(outputs["score"], images[:, 0, 0, :1] + 1)
  assert outputs["attention"].shape == (3, 2, 4)
  for count in (0, 5):
    with pytest.raises(ValueError, match=rf"a batch holds 1\.\.4 images, got {count}"):
      model(np.zeros((count, 8, 8, 3), np.float32))


def test_a_given_config_must_agree_on_the_fields_that_define_the_model():
  config = make_tiny_config("/nonexistent")
  stored = predictor_lib.normalised(config.to_dict())
  assert stored["input"]["crop_ratio"] == list(config.input.crop_ratio)  # Tuples as JSON lists.
  other = make_tiny_config("/elsewhere")  # Not a model field.
  other.input.batch_size = 2
  other.model.encoder.pretrained = "/elsewhere/resnet50.pth"  # Where training started.
  predictor_lib.check_config(other, stored)
  other.input.image_size = 64
  other.score.pooling = "sum"
  with pytest.raises(predictor_lib.PredictError) as error:
    predictor_lib.check_config(other, stored)
  message = str(error.value)
  assert "input.image_size: --config has 64, the checkpoint 32" in message
  assert "score.pooling: --config has 'sum', the checkpoint 'max'" in message
  assert "batch_size" not in message and "pretrained" not in message


def _task(config):
  preferences = input_pipeline.score_preferences(config.score)
  return scoring.make_task(
    config.model, config.score, config.loss, np.full(preferences.shape[1], 0.5), preferences
  )


def test_the_json_says_how_to_feed_the_predictor_and_read_its_outputs():
  config = make_tiny_config("/nonexistent")
  shapes = {
    "score": jax.ShapeDtypeStruct((1, 1), jnp.float32),
    "attention": jax.ShapeDtypeStruct((1, 3, 4), jnp.float32),
  }
  info = predictor_lib.predictor_info(config.to_dict(), _task(config), 7, shapes)
  assert info["format"] == predictor_lib.EXPORT_FORMAT and info["step"] == 7
  assert (info["model"], info["kind"], info["num_scores"]) == ("privattnet", "regression", 1)
  assert info["image_size"] == 32 and info["max_side"] == 256
  assert info["input"]["shape"] == ["batch", 32, 32, 3]
  assert info["outputs"] == {"score": ["batch", 1], "attention": ["batch", 3, 4]}
  assert info["steps"] == 3 and info["grid_shape"] == [2, 2]  # Square images, square grids.
  assert info["target_mean"] == [0.5] and np.shape(info["preferences"]) == (68, 1)
  assert info["attribute_ids"] is None
  mlc = make_tiny_config("/nonexistent", "privattnet_mlc")
  shapes = {
    "score": jax.ShapeDtypeStruct((1, 1), jnp.float32),
    "attribute_probabilities": jax.ShapeDtypeStruct((1, 67), jnp.float32),
  }
  info = predictor_lib.predictor_info(mlc.to_dict(), _task(mlc), 7, shapes)
  assert info["kind"] == "attributes" and info["attribute_ids"] == list(
    attributes.ATTRIBUTE_IDS[1:]
  )
  assert info["grid_shape"] is None and info["steps"] is None
  mlc.data.builder_config = "max512"
  with pytest.raises(
    predictor_lib.PredictError, match="data.builder_config 'max512' is not one of"
  ):
    predictor_lib.predictor_info(mlc.to_dict(), _task(mlc), 7, shapes)
