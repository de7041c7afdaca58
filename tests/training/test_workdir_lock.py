"""workdir_lock: one run per workdir; a second holder is refused, a dead holder's lock taken over."""

import os

import pytest

from privattnet_jax.training import workdir_lock
from tests import subprocesses


def test_workdir_lock_stops_a_second_run_and_is_taken_over_after_a_kill(tmp_path):
  child = subprocesses.hold_workdir_lock(tmp_path)
  try:
    with pytest.raises(
      workdir_lock.WorkdirInUseError, match=f"in use by another run \\(pid {child.pid} on host"
    ):
      workdir_lock.acquire(tmp_path)
  finally:
    child.kill()
    child.wait()
  workdir_lock.acquire(tmp_path)  # The killed run's lock is stale: taken over.
  try:
    assert f"pid {os.getpid()}" in (tmp_path / workdir_lock.LOCK_FILENAME).read_text()
  finally:
    workdir_lock.release(tmp_path)
  assert (tmp_path / workdir_lock.LOCK_FILENAME).read_text() == ""
