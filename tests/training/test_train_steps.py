"""train_steps: the loss and the attention penalty, the train and eval steps, their data-parallel
wrappers and shard_batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privattnet_jax.models import scoring
from privattnet_jax.training import train_state
from privattnet_jax.training import train_steps


def test_compute_loss_by_hand():
  task = scoring.Task(
    kind="regression",
    target_mean=np.array([2.0], np.float32),
    preferences=np.ones((68, 1)),
    pooling="max",
    attention_gamma=0.5,
    attention_tau=0.6,
  )
  outputs = {
    "score": jnp.array([[0.0], [1.0]]),
    "attention": jnp.array([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]),
  }
  batch = {
    "score": jnp.array([[3.0], [2.0]]),
    "mask": jnp.array([1.0, 1.0]),
    "labels": jnp.zeros((2, 68)),
  }
  loss, aux = train_steps.compute_loss(outputs, batch, task)
  # Normalised targets: (3 - 2) * 2 = 2 and 0; squared errors 4 and 1.
  assert float(aux["data_loss"]) == pytest.approx(2.5)
  # Attention totals per location: [1.5, 0.5] and [0, 2]; (0.6 - x)^2 summed: 0.82 and 2.32.
  assert float(aux["attention_penalty"]) == pytest.approx(0.5 * (0.82 + 2.32) / 2)
  assert float(loss) == pytest.approx(2.5 + 0.5 * 1.57)
  masked = dict(batch, mask=jnp.array([1.0, 0.0]))
  assert float(train_steps.compute_loss(outputs, masked, task)[1]["data_loss"]) == pytest.approx(
    4.0
  )
  assert np.asarray(scoring.predicted_scores(outputs, task)).ravel() == pytest.approx([2.0, 2.5])


def _task(kind="regression", target_mean=(0.0,), gamma=0.0, tau=0.0):
  target_mean = np.asarray(target_mean, np.float32)
  return scoring.Task(
    kind=kind,
    target_mean=target_mean,
    preferences=np.ones((68, len(target_mean)), np.float32),
    pooling="max",
    attention_gamma=gamma,
    attention_tau=tau,
  )


def _bce(logits, labels):
  probabilities = 1 / (1 + np.exp(-logits))
  return -(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities))


@pytest.mark.parametrize("num_logits", [68, 67])  # AP-PR, PrivAttNet_MLC (no a0_safe column).
def test_attribute_loss_is_bce_over_the_labels_last_columns(num_logits):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, num_logits)).astype(np.float32)
  labels = (rng.random((3, 68)) < 0.3).astype(np.float32)
  mask = np.array([1.0, 1.0, 0.0], np.float32)
  batch = {"labels": labels, "mask": mask, "score": np.zeros((3, 1), np.float32)}
  loss, aux = train_steps.compute_loss(
    {"attribute_logits": jnp.asarray(logits)}, batch, _task("attributes")
  )
  expected = _bce(logits[:2], labels[:2, 68 - num_logits :]).mean(-1).mean()
  assert float(aux["data_loss"]) == pytest.approx(float(expected), rel=1e-5)
  assert float(aux["attention_penalty"]) == 0.0 and float(loss) == float(aux["data_loss"])
  # The label columns before the head's (a0_safe for PrivAttNet_MLC) and the padded row's are unread.
  labels[:, : 68 - num_logits] = 1 - labels[:, : 68 - num_logits]
  labels[2] = 1 - labels[2]
  again = train_steps.compute_loss(
    {"attribute_logits": jnp.asarray(logits)}, batch, _task("attributes")
  )
  assert float(again[0]) == pytest.approx(float(loss), rel=1e-6)


def test_attention_penalty_is_gamma_times_the_squared_shortfall_of_each_location():
  """gamma * sum_l (tau - sum_t alpha_tl)^2 per image, averaged over the real (mask 1) images."""
  rng = np.random.default_rng(1)
  attention = rng.dirichlet(np.ones(4), size=(3, 3)).astype(np.float32)  # (B, T, L), rows sum to 1.
  gamma, tau = 0.3, 0.6
  outputs = {"score": jnp.zeros((3, 1)), "attention": jnp.asarray(attention)}
  batch = {"score": np.zeros((3, 1), np.float32), "mask": np.array([1.0, 0.0, 1.0], np.float32)}
  _, aux = train_steps.compute_loss(outputs, batch, _task(gamma=gamma, tau=tau))
  per_image = gamma * np.square(tau - attention.sum(axis=1)).sum(-1)
  assert float(aux["attention_penalty"]) == pytest.approx(
    (per_image[0] + per_image[2]) / 2, rel=1e-5
  )


def test_padded_rows_change_neither_term_and_an_all_padding_batch_has_zero_loss():
  rng = np.random.default_rng(2)
  outputs = {
    "score": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
    "attention": jnp.asarray(rng.dirichlet(np.ones(3), size=(4, 2)), jnp.float32),
  }
  batch = {"score": rng.normal(size=(4, 2)).astype(np.float32), "mask": np.float32([1, 1, 0, 0])}
  task = _task(target_mean=(1.0, 2.0), gamma=0.5, tau=0.4)
  real = {key: value[:2] for key, value in outputs.items()}
  _, expected = train_steps.compute_loss(real, {k: v[:2] for k, v in batch.items()}, task)
  padded_outputs = {key: value.at[2:].set(1e3) for key, value in outputs.items()}
  _, aux = train_steps.compute_loss(padded_outputs, batch, task)
  for key in ("loss", "data_loss", "attention_penalty"):
    assert float(aux[key]) == pytest.approx(float(expected[key]), rel=1e-6), key
  loss, _ = train_steps.compute_loss(outputs, dict(batch, mask=np.zeros(4, np.float32)), task)
  assert float(loss) == 0.0


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
    return train_steps.compute_loss(_MODEL.apply({"params": params}, batch["image"]), batch, _TASK)

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
