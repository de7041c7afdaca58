"""Shared fixtures: a tiny synthetic VISPR-format dataset built once per session, and a tiny config."""

import pytest

from configs import demo


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A data_dir whose synthetic dataset (generated + built on first use) all training tests share."""
  return str(tmp_path_factory.mktemp("tiny_data"))


def make_tiny_config(data_dir: str, model_name: str = "privattnet"):
  """A config small enough for a train step in seconds on one CPU core."""
  config = demo.get_config(f"{model_name},tiny")
  config.image_size = 32
  config.batch_size = 8
  config.num_epochs = 1
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 2
  config.data.resize_size = 36
  config.data.data_dir = data_dir
  config.data.synthetic.num_train = 48
  config.data.synthetic.num_val = 12
  config.data.synthetic.num_test = 12
  config.data.synthetic.image_size = 48
  config.model.encoder.width = 8
  config.model.attention.hidden_size = 16
  config.model.attention.regressor_hidden = 8
  return config


@pytest.fixture
def tiny_config(tiny_data_dir):
  return make_tiny_config(tiny_data_dir)
