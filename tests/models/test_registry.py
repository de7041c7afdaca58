"""The variant registry as docs/extending.md uses it: a head defined and registered here, outside
the package, trains through the normal loop and restores from its checkpoint alone."""

import json
import pathlib
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from privattnet_jax import models
from privattnet_jax.models import registry
from privattnet_jax.training import train
from privattnet_jax.training import restore
from tests.conftest import make_tiny_config

EXTENDING = pathlib.Path(__file__).parents[2] / "docs" / "extending.md"


class GatedAttentionHead(nn.Module):
  """Gated attention pooling over the grid, one step: a small attention variant to register."""

  num_outputs: int
  hidden: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool):
    batch, height, width, channels = features.shape
    x = features.reshape(batch, height * width, channels).astype(self.dtype)
    gate = nn.sigmoid(nn.Dense(self.hidden, dtype=self.dtype)(x))
    value = jnp.tanh(nn.Dense(self.hidden, dtype=self.dtype)(x))
    logits = nn.Dense(1, dtype=self.dtype)(gate * value)[..., 0].astype(jnp.float32)
    attention = jax.nn.softmax(logits, axis=-1)
    pooled = jnp.einsum("bl,bld->bd", attention, x.astype(jnp.float32))
    score = nn.Dense(self.num_outputs, dtype=self.dtype)(pooled.astype(self.dtype))
    return {"score": score.astype(jnp.float32), "attention": attention[:, None, :]}


def build_gated_attention(model_config, num_outputs, dtype, batchnorm_axis_name):
  return GatedAttentionHead(num_outputs, hidden=model_config.gated_attention.hidden, dtype=dtype)


registry.register("test_gated_attention", build_gated_attention, attention=True)


def gated_config(data_dir):
  config = make_tiny_config(data_dir)
  config.model.name = "test_gated_attention"
  config.model.module = __name__  # Stored with the checkpoint: a restore imports it first.
  config.model.gated_attention = ml_collections.ConfigDict({"hidden": 8})
  return config


def test_a_registered_head_trains_evaluates_and_restores(tiny_data_dir, tmp_path):
  config = gated_config(tiny_data_dir)
  config.num_train_steps = 2
  config.eval_every_steps = 2
  workdir = tmp_path / "gated"
  results = train.train_and_evaluate(config, str(workdir))

  assert list((workdir / "checkpoints").iterdir())
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [line["loss"] for line in logged if "loss" in line]
  assert losses and all(np.isfinite(losses))
  test_metrics = json.loads((workdir / "eval_test.json").read_text())
  assert test_metrics["n"] == config.data.synthetic.num_test
  assert all(np.isfinite(test_metrics[key]) for key in ("l1", "mse"))
  assert results["test"]["l1"] == pytest.approx(test_metrics["l1"])
  assert "localisation" in test_metrics  # Its attention maps get the attention models' metrics.

  run = restore.restore_checkpoint(workdir)
  assert run.task.kind == "regression"
  assert isinstance(run.model.head, GatedAttentionHead)


def test_the_documented_files_register_through_model_module(tmp_path, monkeypatch):
  """The head file and config file of docs/extending.md, as a user would save them."""
  blocks = re.findall(r"```python\n(.*?)```", EXTENDING.read_text(), re.DOTALL)
  head_file, config_file = blocks[:2]
  (tmp_path / "extending_head.py").write_text(head_file)
  (tmp_path / "extending_config.py").write_text(config_file)
  monkeypatch.syspath_prepend(str(tmp_path))
  config_module = __import__("extending_config")
  config = config_module.get_config()
  # The config names the module; the registry imports it.
  assert "extending_head" not in sys.modules
  config.model.module = "extending_head"
  config.model.encoder.depth, config.model.encoder.width = 0, 8
  model = models.create_model(config.model, num_outputs=2)
  assert "extending_head" in sys.modules
  images = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  outputs = jax.eval_shape(lambda v: model.apply(v, images, train=False), variables)
  assert outputs["score"].shape == (2, 2)
  assert outputs["attention"].shape[:2] == (2, 1)


def test_an_unknown_name_is_one_line_listing_the_registered_names():
  config = default.get_config()
  config.model.name = "nope"
  with pytest.raises(ValueError) as error:
    models.create_model(config.model, num_outputs=1)
  message = str(error.value)
  assert "\n" not in message and message.endswith("got 'nope'")
  assert all(repr(name) in message for name in (*models.MODEL_NAMES, "test_gated_attention"))


def test_a_taken_name_is_refused():
  builtin = registry.lookup(ml_collections.ConfigDict({"name": "privattnet"}))
  with pytest.raises(ValueError, match="'privattnet' is already registered"):
    registry.register("privattnet", build_gated_attention)
  with pytest.raises(ValueError, match="'test_gated_attention' is already registered"):
    registry.register("test_gated_attention", build_gated_attention)
  assert registry.lookup(ml_collections.ConfigDict({"name": "privattnet"})) is builtin


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"kind": "ranking"}, r"kind must be one of \('regression', 'attributes'\)"),
    ({"encoder_stages": 5}, r"encoder_stages must be one of \(None, 3, 4\)"),
  ],
)
def test_bad_facts_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    registry.register("test_never_registered", build_gated_attention, **kwargs)
  assert "test_never_registered" not in registry.names()


def test_a_module_that_cannot_be_imported_is_one_line():
  config = default.get_config()
  config.model.module = "no_such_module_of_heads"
  with pytest.raises(ValueError, match=r"^model.module='no_such_module_of_heads' cannot be"):
    models.create_model(config.model, num_outputs=1)


def test_the_builtin_facts():
  facts = {
    name: (variant.kind, variant.encoder_stages, variant.attention)
    for name in models.MODEL_NAMES
    for variant in [registry.lookup(ml_collections.ConfigDict({"name": name}))]
  }
  assert facts == {
    "privattnet": ("regression", None, True),
    "privattnet_mlc": ("attributes", None, True),
    "privnet": ("regression", 4, False),
    "ap_pr": ("attributes", 4, False),
    "pr_cnn": ("regression", 4, False),
  }
