"""train_state: a run's initial TrainState, and the abstract one a checkpoint restores into."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privattnet_jax import models
from privattnet_jax.data import input_pipeline
from privattnet_jax.models import scoring
from privattnet_jax.training import train_state
from privattnet_jax.training import train_steps
from tests.conftest import make_tiny_config

IMAGE_SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def frozen_run():
  """The tiny PrivAttNet config with a frozen encoder, its task and model, and an initial state."""
  config = make_tiny_config("/nonexistent")
  config.model.encoder.trainable = False
  preferences = input_pipeline.score_preferences(config.score)
  task = scoring.make_task(config.model, config.score, config.loss, [0.5], preferences)
  model = models.create_model(config.model, num_outputs=1, batchnorm_axis_name=train_steps.AXIS)
  state = train_state.create_train_state(
    model, IMAGE_SHAPE, config.model.encoder, config.optim, 10, jax.random.PRNGKey(0)
  )
  return config, model, task, state


def _leaves(tree) -> dict:
  return {
    jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_a_new_state_starts_at_a_strongly_typed_step_zero_without_frozen_encoder_state(frozen_run):
  config, model, task, state = frozen_run
  # A restored step is an int32 array: a weakly typed Python 0 would trace the step a second time.
  assert state.step == 0 and state.step.dtype == np.int32 and not jnp.asarray(state.step).weak_type
  assert set(state.params) == {"encoder", "head"} and "encoder" in state.batch_stats
  optimiser_paths = list(_leaves(state.opt_state))
  assert optimiser_paths and not [path for path in optimiser_paths if "encoder" in path]
  again = train_state.create_train_state(
    model, IMAGE_SHAPE, config.model.encoder, config.optim, 10, jax.random.PRNGKey(0)
  )
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, state.params)
  other = train_state.create_train_state(
    model, IMAGE_SHAPE, config.model.encoder, config.optim, 10, jax.random.PRNGKey(1)
  )
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(
      jax.tree_util.tree_leaves(other.params), jax.tree_util.tree_leaves(state.params)
    )
  )


def test_the_abstract_state_has_the_states_shapes_replicated_and_reads_no_weight_file(frozen_run):
  config, model, task, state = frozen_run
  config = config.copy_and_resolve_references()
  config.model.encoder.pretrained = "/nonexistent/resnet50.pth"
  mesh = train_steps.create_mesh()
  abstract = train_state.abstract_train_state(
    model, config.input.image_size, config.model.encoder, config.optim, mesh
  )
  assert config.model.encoder.pretrained == "/nonexistent/resnet50.pth"  # The caller's config.
  expected, actual = _leaves(state), _leaves(abstract)
  assert list(actual) == list(expected)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for path, leaf in actual.items():
    assert isinstance(leaf, jax.ShapeDtypeStruct), path
    assert (leaf.shape, leaf.dtype) == (np.shape(expected[path]), expected[path].dtype), path
    assert leaf.sharding == replicated, path
