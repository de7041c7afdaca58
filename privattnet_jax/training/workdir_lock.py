"""One training run per workdir: an advisory lock file holding the owner's pid and host.

Two runs on one workdir would write each other's checkpoints (a later resume would continue
the wrong run), so the second stops at once with a message naming the first. The lock is an
`fcntl.flock` on <workdir>/.run.lock: the kernel drops it when its process ends, however it
ends, so a lock left by a killed run is taken over without any staleness guess. Within one
process the lock is re-entrant (tests and notebooks train the same workdir again). flock is
not reliable on every network file system; there the lock is best-effort.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import time

from absl import logging

LOCK_FILENAME = ".run.lock"
_held: dict[str, int] = {}  # resolved workdir -> the open lock file descriptor of this process.


class WorkdirInUseError(RuntimeError):
  """Another live run holds the workdir; the message names its pid and host."""


def acquire(workdir: str | os.PathLike) -> None:
  """Takes the workdir's lock for this process (again: no-op).

  Raises WorkdirInUseError if another run holds it.
  """
  try:
    import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only.
  except ImportError:
    return
  workdir = pathlib.Path(workdir)
  key = os.path.realpath(workdir)
  if key in _held:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILENAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
  previous = os.read(fd, 4096).decode(errors="replace").strip()
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise WorkdirInUseError(
      f"{workdir} is in use by another run ({previous or 'owner unknown'}); wait for it to end or use "
      "another --workdir"
    ) from None
  if previous:
    logging.info("took over the lock of an earlier run that has ended (%s)", previous)
  os.ftruncate(fd, 0)
  os.pwrite(
    fd,
    f"pid {os.getpid()} on host {socket.gethostname()}, since "
    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n".encode(),
    0,
  )
  _held[key] = fd


def release(workdir: str | os.PathLike) -> None:
  """Drops this process's lock on the workdir (if held); the file stays, empty."""
  fd = _held.pop(os.path.realpath(workdir), None)
  if fd is not None:
    os.ftruncate(
      fd, 0
    )  # Empty: the run ended normally (a killed run's owner line stays, for the next).
    os.close(fd)  # Closing the descriptor releases the flock.


@contextlib.contextmanager
def released_on_error(workdir: str | os.PathLike):
  """Keeps the lock when the block succeeds and releases it when the block raises."""
  try:
    yield
  except BaseException:
    release(workdir)
    raise
