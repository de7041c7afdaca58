"""restore: a checkpoint restored from its workdir alone (no dataset, no weight file), and its step."""

import json

import jax
import numpy as np
import pytest

from privattnet_jax import models
from privattnet_jax.data import input_pipeline
from privattnet_jax.models import scoring
from privattnet_jax.training import checkpoints
from privattnet_jax.training import restore
from privattnet_jax.training import train_state
from privattnet_jax.training import train_steps
from tests.conftest import make_tiny_config

SPEARMAN = {1: 0.2, 3: 0.5, 5: 0.1}  # Step 3 is the best, not the latest.


def _write_run(workdir, config, *, with_table=True) -> dict:
  """Checkpoints at the steps of SPEARMAN as train.py writes them; {step: the state saved}."""
  preferences = input_pipeline.score_preferences(config.score)
  task = scoring.make_task(config.model, config.score, config.loss, [0.75], preferences)
  model = models.create_model(config.model, num_outputs=1, batchnorm_axis_name=train_steps.AXIS)
  initial = train_state.create_train_state(
    model, (32, 32, 3), config.model.encoder, config.optim, 10, jax.random.PRNGKey(0)
  )
  metadata = {"config": config.to_dict(), "target_mean": [0.75]}
  if with_table:
    metadata["preferences"] = (
      preferences * 2
    ).tolist()  # Not the config's table: the stored one wins.
  manager = checkpoints.create_manager(workdir, keep=3)
  frozen = checkpoints.save_frozen_encoder(workdir, initial, config.model.encoder)
  saved = {}
  for step, spearman in SPEARMAN.items():
    # Only the head trains (a frozen encoder's values are the ones save_frozen_encoder wrote).
    head = jax.tree_util.tree_map(lambda x: x + step, initial.params["head"])
    state = initial.replace(step=np.int32(step), params={**initial.params, "head": head})
    checkpoints.save(
      manager, step, state, None, metadata, {checkpoints.SELECTION_METRIC: spearman}, frozen
    )
    saved[step] = jax.device_get(state)
  manager.wait_until_finished()
  manager.close()
  return saved


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = make_tiny_config("/nonexistent")  # Neither the dataset nor a weight file exists.
  config.model.encoder.trainable = False  # A frozen encoder: saved once beside the checkpoints.
  workdir = tmp_path_factory.mktemp("restore") / "run"
  return config, workdir, _write_run(workdir, config)


def test_the_best_checkpoint_restores_with_its_config_and_stored_score_table(run):
  config, workdir, saved = run
  restored = restore.restore_checkpoint(workdir)
  assert restored.step == 3
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(restored.state.params), saved[3].params
  )
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(restored.state.batch_stats), saved[3].batch_stats
  )
  assert restored.config.to_dict() == json.loads(json.dumps(config.to_dict()))  # Tuples as lists.
  preferences = input_pipeline.score_preferences(config.score)
  assert restored.task == scoring.make_task(
    config.model, config.score, config.loss, [0.75], preferences * 2
  )
  assert restored.mesh.axis_names == (train_steps.AXIS,)


def test_a_named_step_restores_and_a_missing_one_is_refused_naming_those_there_are(run, tmp_path):
  _, workdir, saved = run
  latest = restore.restore_checkpoint(workdir, step=5)
  assert latest.step == 5 and int(latest.state.step) == 5
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(latest.state.params), saved[5].params
  )
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7; available: \[1, 3, 5\]"):
    restore.restore_checkpoint(workdir, step=7)
  with pytest.raises(
    FileNotFoundError, match=f"no checkpoint in {tmp_path / 'checkpoints'}: train first"
  ):
    restore.restore_checkpoint(tmp_path)


def test_a_checkpoint_without_a_stored_table_takes_its_configs(tmp_path):
  config = make_tiny_config("/nonexistent")
  config.score.pooling = "sum"
  _write_run(tmp_path, config, with_table=False)
  restored = restore.restore_checkpoint(tmp_path, step=1)
  expected = scoring.make_task(
    config.model, config.score, config.loss, [0.75], input_pipeline.score_preferences(config.score)
  )
  assert restored.task == expected and restored.task.pooling == "sum"
