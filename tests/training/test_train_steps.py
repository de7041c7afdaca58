"""train_steps: the train and eval steps, their data-parallel wrappers and shard_batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privattnet_jax.training import loss as loss_lib
from privattnet_jax.training import train_state
from privattnet_jax.training import train_steps
from tests.training.test_loss import _task


class _TinyModel(nn.Module):
  """The model interface the steps use, in two dense layers: an encoder and a head with attention."""

  steps: int = 2
  locations: int = 3

  def setup(self):
    self.score_layer = nn.Dense(1)
    self.attention_layer = nn.Dense(self.steps * self.locations)

  def encode(self, images, train=False):
    return images.reshape(images.shape[0], -1)

  def head_from_features(self, features, train=False):
    logits = self.attention_layer(features).reshape(-1, self.steps, self.locations)
    return {"score": self.score_layer(features), "attention": jax.nn.softmax(logits, -1)}

  def __call__(self, images, train=False):
    return self.head_from_features(self.encode(images, train), train)


_MODEL = _TinyModel()
_TASK = _task(target_mean=(1.5,), gamma=0.5, tau=0.8)


def _state(learning_rate=0.1):
  params = _MODEL.init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))["params"]
  return train_state.TrainState.create(
    apply_fn=_MODEL.apply,
    params=params,
    batch_stats={},
    tx=optax.sgd(learning_rate),
    rng=jax.random.key(1),
  )


def _batch(seed=0, size=4, padded=1):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.normal(size=(size, 2, 2, 3)).astype(np.float32),
    "score": rng.uniform(0, 3, (size, 1)).astype(np.float32),
    "labels": (rng.random((size, 68)) < 0.2).astype(np.float32),
    "mask": np.float32([1] * (size - padded) + [0] * padded),
    "image_id": np.array([f"2017_{i}" for i in range(size)]),
  }


def test_train_step_is_one_optimiser_step_on_the_loss_and_padded_rows_do_not_move_it():
  mesh = train_steps.create_mesh()
  step = train_steps.parallel_train_step(mesh, _TASK)
  assert (
    train_steps.parallel_train_step(mesh, _task(target_mean=(1.5,), gamma=0.5, tau=0.8)) is step
  )
  batch = _batch()
  reference = _state()

  def loss(params):
    return loss_lib.compute_loss(_MODEL.apply({"params": params}, batch["image"]), batch, _TASK)

  (expected_loss, expected_aux), grads = jax.value_and_grad(loss, has_aux=True)(reference.params)
  new_state, metrics = step(_state(), train_steps.shard_batch(batch, mesh))
  assert int(new_state.step) == 1
  jax.tree_util.tree_map(
    lambda new, old, grad: np.testing.assert_allclose(new, old - 0.1 * grad, rtol=1e-5, atol=1e-7),
    jax.device_get(new_state.params),
    reference.params,
    grads,
  )
  assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=1e-5)
  for key in ("data_loss", "attention_penalty"):
    assert float(metrics[key]) == pytest.approx(float(expected_aux[key]), rel=1e-5), key
  assert float(metrics["attention_penalty"]) > 0
  assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
  # Other images and scores in the padded row: the same step.
  other = _batch(seed=1)
  padded = dict(batch, image=batch["image"].copy(), score=batch["score"].copy())
  padded["image"][-1], padded["score"][-1] = other["image"][-1] * 100, other["score"][-1] + 50
  again, again_metrics = step(_state(), train_steps.shard_batch(padded, mesh))
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(again.params), jax.device_get(new_state.params)
  )
  assert float(again_metrics["loss"]) == float(metrics["loss"])


def test_eval_step_gives_raw_scores_and_echoes_the_targets():
  mesh = train_steps.create_mesh()
  state, batch = _state(), _batch()
  outputs = _MODEL.apply({"params": state.params}, batch["image"])
  result = jax.device_get(
    train_steps.parallel_eval_step(mesh, _TASK)(state, train_steps.shard_batch(batch, mesh))
  )
  assert "score" not in result
  np.testing.assert_allclose(result["prediction"], outputs["score"] / 2 + 1.5, rtol=1e-6)
  np.testing.assert_allclose(result["attention"], outputs["attention"], rtol=1e-6)
  for key, name in (("target", "score"), ("labels", "labels"), ("mask", "mask")):
    np.testing.assert_array_equal(result[key], batch[name])


def test_cached_features_through_the_head_give_what_images_give():
  state, batch = _state(), _batch()
  features = _MODEL.apply({"params": state.params}, batch["image"], method="encode")
  from_images = train_steps.apply_model(state, state.params, {"image": batch["image"]})
  from_features = train_steps.apply_model(state, state.params, {"features": features})
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_features, from_images)


def test_shard_batch_keeps_what_the_steps_read_split_over_the_batch_axis():
  mesh = train_steps.create_mesh()
  batch = _batch()
  sharded = train_steps.shard_batch(batch, mesh)
  assert set(sharded) == {"image", "score", "labels", "mask"}  # No image_id: host strings stay.
  for key, value in sharded.items():
    assert isinstance(value, jax.Array)
    assert value.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train_steps.AXIS)), value.ndim
    )
    np.testing.assert_array_equal(jax.device_get(value), batch[key])
  already = dict(batch, image=sharded["image"])
  assert train_steps.shard_batch(already, mesh)["image"] is sharded["image"]
