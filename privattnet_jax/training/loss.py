"""The training loss: the paper's regression (or, for attribute heads, BCE) term and the attention
penalty, averaged over a batch's real rows (padding rows have mask 0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from privattnet_jax.data import attributes
from privattnet_jax.models import scoring


def attention_penalty(attention, mask, gamma: float, tau: float) -> jax.Array:
  """gamma * sum_i (tau - sum_t alpha_ti)^2, averaged over the real rows: AMNet's doubly stochastic
  term, which asks the T steps together to look at every location about tau times."""
  attention_total = attention.astype(jnp.float32).sum(axis=1)
  count = jnp.maximum(mask.sum(), 1.0)
  return gamma * (jnp.square(tau - attention_total).sum(-1) * mask).sum() / count


def compute_loss(outputs: dict, batch: dict, task: scoring.Task) -> tuple[jax.Array, dict]:
  """The paper's loss: MSE on (y - mean) * 2 (or BCE for attribute heads) + the attention penalty."""
  mask = batch["mask"]
  count = jnp.maximum(mask.sum(), 1.0)
  if task.kind == "regression":
    target = (batch["score"] - task.target_mean) * 2
    per_example = jnp.square(outputs["score"].astype(jnp.float32) - target).mean(-1)
  else:
    logits = outputs["attribute_logits"].astype(jnp.float32)
    labels = batch["labels"][:, attributes.NUM_ATTRIBUTES - logits.shape[-1] :]
    per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
  data_loss = (per_example * mask).sum() / count
  penalty = jnp.zeros(())
  if "attention" in outputs:
    penalty = attention_penalty(
      outputs["attention"], mask, task.attention_gamma, task.attention_tau
    )
  loss = data_loss + penalty
  return loss, {"loss": loss, "data_loss": data_loss, "attention_penalty": penalty}
