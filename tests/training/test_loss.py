"""loss: the regression and attribute terms, the attention penalty, and padding rows counting zero."""

import jax.numpy as jnp
import numpy as np
import pytest

from privattnet_jax.models import scoring
from privattnet_jax.training import loss as loss_lib


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
  loss, aux = loss_lib.compute_loss(outputs, batch, task)
  # Normalised targets: (3 - 2) * 2 = 2 and 0; squared errors 4 and 1.
  assert float(aux["data_loss"]) == pytest.approx(2.5)
  # Attention totals per location: [1.5, 0.5] and [0, 2]; (0.6 - x)^2 summed: 0.82 and 2.32.
  assert float(aux["attention_penalty"]) == pytest.approx(0.5 * (0.82 + 2.32) / 2)
  assert float(loss) == pytest.approx(2.5 + 0.5 * 1.57)
  masked = dict(batch, mask=jnp.array([1.0, 0.0]))
  assert float(loss_lib.compute_loss(outputs, masked, task)[1]["data_loss"]) == pytest.approx(4.0)
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
  loss, aux = loss_lib.compute_loss(
    {"attribute_logits": jnp.asarray(logits)}, batch, _task("attributes")
  )
  expected = _bce(logits[:2], labels[:2, 68 - num_logits :]).mean(-1).mean()
  assert float(aux["data_loss"]) == pytest.approx(float(expected), rel=1e-5)
  assert float(aux["attention_penalty"]) == 0.0 and float(loss) == float(aux["data_loss"])
  # The label columns before the head's (a0_safe for PrivAttNet_MLC) and the padded row's are unread.
  labels[:, : 68 - num_logits] = 1 - labels[:, : 68 - num_logits]
  labels[2] = 1 - labels[2]
  again = loss_lib.compute_loss(
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
  _, aux = loss_lib.compute_loss(outputs, batch, _task(gamma=gamma, tau=tau))
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
  _, expected = loss_lib.compute_loss(real, {k: v[:2] for k, v in batch.items()}, task)
  padded_outputs = {key: value.at[2:].set(1e3) for key, value in outputs.items()}
  _, aux = loss_lib.compute_loss(padded_outputs, batch, task)
  for key in ("loss", "data_loss", "attention_penalty"):
    assert float(aux[key]) == pytest.approx(float(expected[key]), rel=1e-6), key
  loss, _ = loss_lib.compute_loss(outputs, dict(batch, mask=np.zeros(4, np.float32)), task)
  assert float(loss) == 0.0
