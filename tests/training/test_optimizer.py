"""optimizer: Adam with coupled L2, the learning-rate schedules, and a frozen encoder left alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privattnet_jax.training import optimizer
from tests.conftest import make_tiny_config


def _config(trainable=False, schedule="constant", learning_rate=0.01, weight_decay=0.0):
  config = make_tiny_config("/nonexistent")
  config.model.encoder.trainable = trainable
  config.optim.schedule = schedule
  config.optim.learning_rate = learning_rate
  config.optim.weight_decay = weight_decay
  config.optim.warmup_steps = 2
  return config


PARAMS = {"encoder": {"w": jnp.ones(3)}, "head": {"w": jnp.array([1.0, 2.0])}}


def _updates(config, grads_per_step, total_steps=10, params=PARAMS):
  """The updates of successive steps, each computed at `params` from that step's gradients."""
  tx = optimizer.create_optimizer(config.optim, config.model.encoder.trainable, params, total_steps)
  state, updates = tx.init(params), []
  for grads in grads_per_step:
    update, state = tx.update(grads, state, params)
    updates.append(jax.device_get(update))
  return updates, state


def test_a_frozen_encoder_gets_no_update_and_no_state_while_the_head_is_trained():
  grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  (update,), state = _updates(_config(trainable=False, weight_decay=0.1), [grads])
  np.testing.assert_array_equal(update["encoder"]["w"], np.zeros(3))
  assert np.all(update["head"]["w"] < 0)
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert paths and not [path for path in paths if "encoder" in path]
  (trained,), _ = _updates(_config(trainable=True), [grads])
  assert np.all(trained["encoder"]["w"] < 0)


def test_weight_decay_is_added_to_the_gradient_before_adam():
  """Coupled L2 (torch Adam's weight_decay): with a zero gradient, Adam normalises the decay term
  itself, so each parameter moves by the learning rate, whatever its size (AdamW's decoupled decay
  would move them by learning_rate * decay * value: 0.001 and 0.002)."""
  zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  (update,), _ = _updates(_config(trainable=True, weight_decay=0.1), [zeros])
  np.testing.assert_allclose(update["head"]["w"], [-0.01, -0.01], rtol=1e-5)
  (no_decay,), _ = _updates(_config(trainable=True, weight_decay=0.0), [zeros])
  np.testing.assert_array_equal(no_decay["head"]["w"], [0.0, 0.0])


@pytest.mark.parametrize(
  "schedule, total_steps, expected",
  [
    ("constant", 2, [0.01, 0.01, 0.01]),
    ("cosine", 2, [0.01, 0.005, 0.0]),  # lr * (1 + cos(pi * step / total)) / 2.
    ("warmup_cosine", 10, [0.0, 0.005, 0.01]),  # Linear from 0 over the 2 warm-up steps.
  ],
)
def test_learning_rate_schedules(schedule, total_steps, expected):
  """With a constant gradient Adam's step is the learning rate itself, so the updates trace it."""
  grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  updates, _ = _updates(_config(trainable=True, schedule=schedule), [grads] * 3, total_steps)
  np.testing.assert_allclose([-u["head"]["w"][0] for u in updates], expected, atol=1e-7, rtol=1e-4)


def test_only_schedules_depend_on_the_step_count_and_an_unknown_one_is_named():
  constant = _config(schedule="constant")
  assert optimizer.create_optimizer(
    constant.optim, constant.model.encoder.trainable, PARAMS, 10
  ) is optimizer.create_optimizer(constant.optim, constant.model.encoder.trainable, PARAMS, 20)
  cosine = _config(schedule="cosine")
  assert optimizer.create_optimizer(
    cosine.optim, cosine.model.encoder.trainable, PARAMS, 10
  ) is not optimizer.create_optimizer(cosine.optim, cosine.model.encoder.trainable, PARAMS, 20)
  with pytest.raises(ValueError, match="constant, cosine or warmup_cosine, got 'linear'"):
    optimizer.create_optimizer(
      _config(schedule="linear").optim,
      _config(schedule="linear").model.encoder.trainable,
      PARAMS,
      10,
    )
