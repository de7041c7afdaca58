"""The TrainState and how a run's initial state is made (initial weights, optimiser, shapes)."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from privattnet_jax.models import weights
from privattnet_jax.training import optimizer as optimizer_lib


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # Dropout key; each step folds in its step number and device index.


@functools.partial(jax.jit, static_argnums=(0, 3))
def _init(model, rngs, inputs, method: str):
  """`model.init` through `method` ("__call__": the whole model on images)."""
  return model.init(rngs, inputs, train=False, method=method)


# One traced (and cached) program instead of an eager op per parameter and optimizer partition,
# as TrainState.create would run: those ops were a visible part of a run's start-up
# (docs/benchmarks.md, "The demo's second run: first train step"; 0.8 s with Lite0).
@functools.partial(jax.jit, static_argnums=0)
def _init_optimizer(tx, params):
  return tx.init(params)


def initial_variables(model, rngs: dict, image_shape, pretrained: str) -> dict:
  """The model's initial variables, the encoder's read from the weight file `pretrained` if set.

  The file replaces every encoder value, so then the encoder is traced for its shapes only
  (`jax.eval_shape`: not lowered, compiled or run, where the whole init took a large part of the
  demo's start-up: docs/benchmarks.md, "Each step traced once per process") and the head is
  initialised alone. Its values are those of the whole model's init: Flax derives each submodule's
  keys from its path, not from what ran before it.
  """
  images = jnp.zeros((1, *image_shape), jnp.float32)
  if not pretrained:
    return flax.core.unfreeze(_init(model, rngs, images, "__call__"))
  features, encoder = jax.eval_shape(
    functools.partial(model.init_with_output, train=False, method="encode"), rngs, images
  )
  features = jnp.zeros(features.shape, features.dtype)
  head = flax.core.unfreeze(_init(model, rngs, features, "head_from_features"))
  variables = {
    collection: {**head.get(collection, {}), **encoder.get(collection, {})}
    for collection in {**head, **encoder}
  }
  return weights.load_pretrained(pretrained, variables)


def create_train_state(
  model, image_shape, encoder_config, optim_config, total_steps: int, rng, attribute_bias=None
) -> TrainState:
  """A run's first state: initial (or pretrained) variables and the optimiser's state.

  `attribute_bias`: a function of the initial params that sets an attribute head's logit bias.
  """
  init_rng, params_rng, dropout_rng = jax.random.split(rng, 3)
  variables = initial_variables(
    model, {"params": params_rng, "dropout": init_rng}, image_shape, encoder_config.pretrained
  )
  params = variables["params"]
  if attribute_bias is not None:
    params = attribute_bias(params)
  tx = optimizer_lib.create_optimizer(optim_config, encoder_config.trainable, params, total_steps)
  return TrainState(
    # Not weakly typed, as a restored step is: new and resumed runs share one traced step.
    step=np.int32(0),
    apply_fn=model.apply,
    params=params,
    tx=tx,
    opt_state=_init_optimizer(tx, params),
    batch_stats=variables.get("batch_stats", {}),
    rng=dropout_rng,
  )


def abstract_train_state(model, image_size: int, encoder_config, optim_config, mesh) -> TrainState:
  """The shapes (replicated over `mesh`) of the TrainState a checkpoint of this model holds.

  Traced, never run: no initialisation is computed and no pretrained weight file is read, so a
  checkpoint restores where neither the training data nor the encoder's weight file exist.
  """
  encoder_config = ml_collections.ConfigDict(encoder_config.to_dict())
  encoder_config.pretrained = ""  # The restored values replace any initial weights.
  image_shape = (image_size, image_size, 3)
  shapes = jax.eval_shape(
    lambda rng: create_train_state(model, image_shape, encoder_config, optim_config, 1, rng),
    jax.random.PRNGKey(0),
  )
  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes
  )
