"""train_steps: the loss and the attention penalty, the train and eval steps, their data-parallel
wrappers and shard_batch."""

import jax.numpy as jnp
import numpy as np
import pytest

from privattnet_jax.models import scoring
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
