"""Two processes joined by jax.distributed (one CPU device each, gloo collectives), both feeds.

One device per process is the one-process-per-GPU layout, and the harder one: nothing can be
replicated by copying between a process's own devices (several local devices per process are
covered by the 2-device tests in one process).

One pair of processes trains the image path and then the on-device feature path: each run is
short, and a pair costs two imports and, without a compilation cache (see subprocesses.py), every
compile twice, so the two runs share one pair, and one model: the frozen encoder that cached
features need, so the image run's programs are the smaller frozen-encoder ones and the model is
initialised by one program (the pair: 39 s and 70 CPU-s instead of 59 s and 109 CPU-s with a
trained encoder in the image run). Gradient and BatchNorm all-reduces of a trained encoder are the
same collectives over more arrays; the 2-device tests in one process check them. Each process records the parameters it holds in
memory at every checkpoint (a spy on `checkpoints.save`): restoring the checkpoint would read the
same files in both processes and could not tell diverged replicas apart.
"""

import json

import numpy as np
import pytest

from privattnet_jax import data
from tests import subprocesses
from tests.conftest import make_tiny_config

_SCRIPT = """
import numpy as np
from privattnet_jax.training import checkpoints
from privattnet_jax.training import train
from tests.training.test_device_features import _on_device_config

held = {{}}  # step -> this process's own copy of the parameters it is about to save.
save = checkpoints.save
def spy(manager, step, state, *args, **kwargs):
  leaves = jax.tree_util.tree_leaves(state.params)
  held[step] = np.concatenate([np.asarray(x.addressable_data(0)).ravel() for x in leaves])
  return save(manager, step, state, *args, **kwargs)
checkpoints.save = spy

image_config = _on_device_config({data_dir!r}, {out!r} + "/cache")
image_config.feature_cache.mode = "off"  # Images through the grain pipeline.
image_config.num_train_steps = 2
image_config.eval_splits = ("test",)
train.train_and_evaluate(image_config, {out!r} + "/image_run")
np.save({out!r} + f"/image_params_{{process_id}}.npy", held.pop(2))

device_config = _on_device_config({data_dir!r}, {out!r} + "/cache")
device_config.num_train_steps = 3
device_config.eval_every_steps = 3
device_config.eval_splits = ("validation",)
results = train.train_and_evaluate(device_config, {out!r} + "/device_run")
np.save({out!r} + f"/device_params_{{process_id}}.npy", held.pop(3))
print("DONE", jax.process_count(), jax.device_count(), results["validation"]["n"])
"""


@pytest.fixture(scope="module")
def two_process_runs(tiny_data_dir, tmp_path_factory):
  """The output folder of one pair of processes that ran both trainings, and their stdouts."""
  data.load_data_sources(
    make_tiny_config(tiny_data_dir).data
  )  # Built once, before two readers start.
  out = tmp_path_factory.mktemp("multihost")
  script = _SCRIPT.format(data_dir=tiny_data_dir, out=str(out))
  stdouts = subprocesses.run_on_two_processes(script, devices=1)
  return out, stdouts


def test_image_path_keeps_the_processes_parameters_identical(two_process_runs):
  """Each process reads its shard of every batch; the all-reduced steps keep the replicas equal."""
  out, _ = two_process_runs
  first, second = (np.load(out / f"image_params_{i}.npy") for i in range(2))
  np.testing.assert_array_equal(first, second)
  assert json.loads((out / "image_run" / "eval_test.json").read_text())["n"] == 12


def test_device_features_keep_the_processes_parameters_identical(two_process_runs):
  """Each process loads its devices' share of the cache; the steps all-reduce across processes."""
  out, stdouts = two_process_runs
  for stdout in stdouts:
    assert "DONE 2 2 12" in stdout
  first, second = (np.load(out / f"device_params_{i}.npy") for i in range(2))
  np.testing.assert_array_equal(first, second)
