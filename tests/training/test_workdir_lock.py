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


def test_the_lock_is_reentrant_within_a_process_and_names_its_holder(tmp_path):
  workdir = tmp_path / "new" / "run"  # Created on the way.
  workdir_lock.acquire(workdir)
  try:
    workdir_lock.acquire(workdir)  # Again, e.g. a notebook training the same workdir twice.
    workdir_lock.acquire(tmp_path / "new" / ".." / "new" / "run")  # Another name for it.
    owner = (workdir / workdir_lock.LOCK_FILENAME).read_text()
    assert owner.startswith(f"pid {os.getpid()} on host ") and owner.count("\n") == 1
  finally:
    workdir_lock.release(workdir)
  assert (workdir / workdir_lock.LOCK_FILENAME).read_text() == ""
  workdir_lock.release(workdir)  # Not held: nothing to do.


def test_released_on_error_keeps_the_lock_after_success_and_drops_it_after_an_error(tmp_path):
  workdir_lock.acquire(tmp_path)
  try:
    with workdir_lock.released_on_error(tmp_path):
      pass
    assert f"pid {os.getpid()}" in (tmp_path / workdir_lock.LOCK_FILENAME).read_text()
    with pytest.raises(KeyError), workdir_lock.released_on_error(tmp_path):
      raise KeyError("setup failed")
    assert (tmp_path / workdir_lock.LOCK_FILENAME).read_text() == ""
    child = subprocesses.hold_workdir_lock(tmp_path)  # Free for another run now.
    child.kill()
    child.wait()
  finally:
    workdir_lock.release(tmp_path)
