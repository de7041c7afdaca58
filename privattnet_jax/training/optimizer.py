"""The optimiser: Adam with coupled L2, the learning-rate schedule, a frozen encoder masked out."""

from __future__ import annotations

import functools

import ml_collections
import optax


def create_optimizer(
  optim_config, encoder_trainable: bool, params, total_steps: int
) -> optax.GradientTransformation:
  """Adam with coupled L2 (added to the gradient before Adam, as torch's Adam weight_decay).

  A frozen encoder's parameters are mapped to `set_to_zero`: no update, no optimiser state.
  Equal arguments give the same object (a TrainState's treedef holds it: see the module docstring).
  """
  optim = ml_collections.FrozenConfigDict(optim_config)
  schedule_steps = 0 if optim.schedule == "constant" else total_steps  # Only schedules use it.
  return _optimizer(optim, encoder_trainable, tuple(params), schedule_steps)


@functools.lru_cache(maxsize=16)
def _optimizer(optim, trainable: bool, param_names: tuple[str, ...], total_steps: int):
  if optim.schedule == "constant":
    learning_rate = optim.learning_rate
  elif optim.schedule == "cosine":
    learning_rate = optax.cosine_decay_schedule(optim.learning_rate, max(total_steps, 1))
  elif optim.schedule == "warmup_cosine":
    learning_rate = optax.warmup_cosine_decay_schedule(
      0.0, optim.learning_rate, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1)
    )
  else:
    raise ValueError(
      f"optim.schedule must be constant, cosine or warmup_cosine, got {optim.schedule!r}"
    )
  tx = optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.adam(learning_rate))
  if trainable:
    return tx
  labels = {name: "frozen" if name == "encoder" else "trained" for name in param_names}
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
