"""Checkpoint saving: a frozen encoder is written once and referenced, the rest restores exactly."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from privattnet_jax.training import checkpoints
from privattnet_jax.training import train_state


def _encoder_config(trainable=False, batchnorm="frozen"):
  return ml_collections.ConfigDict({"trainable": trainable, "batchnorm": batchnorm})


def _state(seed=0):
  """A small TrainState shaped as the models': an encoder and a head, BatchNorm statistics."""
  rng = np.random.default_rng(seed)
  params = {
    "encoder": {"conv": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)},
    "head": {"dense": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
  }
  batch_stats = {"encoder": {"mean": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
  tx = optax.multi_transform(
    {"trained": optax.adam(1e-3), "frozen": optax.set_to_zero()},
    {"encoder": "frozen", "head": "trained"},
  )
  return jax.device_put(
    train_state.TrainState.create(
      apply_fn=None, params=params, batch_stats=batch_stats, tx=tx, rng=jax.random.PRNGKey(seed)
    )
  )


def _abstract(state):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
  "batchnorm, collections", [("frozen", ["params", "batch_stats"]), ("update", ["params"])]
)
def test_frozen_encoder_is_written_once_and_checkpoints_restore_exactly(
  tmp_path, batchnorm, collections
):
  encoder_config = _encoder_config(batchnorm=batchnorm)
  state = _state()
  reference = checkpoints.save_frozen_encoder(tmp_path, state, encoder_config)
  assert reference["collections"] == collections
  folder = tmp_path / checkpoints.FROZEN_ENCODER_DIR / reference["sha256"]
  written = folder.stat().st_mtime_ns
  assert (
    checkpoints.save_frozen_encoder(tmp_path, state, encoder_config) == reference
  )  # A resumed run.
  assert folder.stat().st_mtime_ns == written and len(list(folder.parent.iterdir())) == 1

  manager = checkpoints.create_manager(tmp_path, keep=1)
  for step in (1, 2):
    moved = state.replace(
      step=jnp.asarray(step, state.step.dtype),
      params={**state.params, "head": {"dense": state.params["head"]["dense"] + step}},
    )
    checkpoints.save(
      manager, step, moved, None, {"step": step}, {"spearman": 0.5 - step}, reference
    )
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2]  # The latest, and the best by validation Spearman.
  # The checkpoint holds no encoder array of the frozen collections; restoring puts them back.
  stored = manager.item_metadata(2)["state"]
  for name in ("params", "batch_stats"):
    assert ("encoder" in stored[name]) == (name not in collections)
  restored, metadata = checkpoints.restore(manager, 2, _abstract(state))
  assert metadata["frozen_encoder"] == reference and metadata["step"] == 2
  _assert_trees_equal(restored, moved)


def test_a_trainable_encoder_is_saved_in_every_checkpoint(tmp_path):
  assert (
    checkpoints.save_frozen_encoder(tmp_path, _state(), _encoder_config(trainable=True)) is None
  )
  assert not (tmp_path / checkpoints.FROZEN_ENCODER_DIR).exists()


def test_another_encoder_gets_its_own_folder_and_a_missing_one_is_named(tmp_path):
  first = checkpoints.save_frozen_encoder(tmp_path, _state(0), _encoder_config())
  second = checkpoints.save_frozen_encoder(tmp_path, _state(1), _encoder_config())
  assert first["sha256"] != second["sha256"]
  manager = checkpoints.create_manager(tmp_path, keep=1)
  checkpoints.save(manager, 1, _state(1), None, {}, None, second)
  manager.wait_until_finished()
  folder = tmp_path / checkpoints.FROZEN_ENCODER_DIR / second["sha256"]
  folder.rename(folder.with_name("moved"))
  with pytest.raises(FileNotFoundError, match=second["sha256"]):
    checkpoints.restore(manager, 1, _abstract(_state(1)))
