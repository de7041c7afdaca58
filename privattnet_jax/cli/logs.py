"""The run's log: absl's handler without libraries' routine INFO lines and restated warnings."""

from __future__ import annotations

import logging as std_logging

from absl import logging

from privattnet_jax.cli import errors

# Libraries whose INFO lines (per checkpoint file, per dataset shard) would bury the progress log.
QUIET_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/", "/array_record/")
# Library warnings that only restate what this program asked for: evaluate, predict and export
# open the checkpoints read-only.
EXPECTED_WARNINGS = ("Given directory is read only",)


def quiet_library_info(workdir: str | None) -> None:
  """Filters absl's handler with `keep_record`, for the rest of the process."""
  logging.get_absl_handler().addFilter(lambda record: keep_record(record, workdir))


def keep_record(record: std_logging.LogRecord, workdir: str | None) -> bool:
  """Drops the libraries' INFO lines, EXPECTED_WARNINGS and the tracebacks of their other records.

  Orbax logs a traceback per failed background write on a full disk; the run's own one-line error
  follows, with its traceback in errors.log.
  """
  # asyncio's abandoned tasks after a failed restore: see errors.route_library_tracebacks_to_errors_log.
  if record.name == "asyncio" and record.exc_info:
    errors.save_traceback(record.exc_info[1], workdir)
    return False
  if not any(lib in record.pathname for lib in QUIET_LIBRARIES):
    return True
  if record.levelno < std_logging.WARNING or record.getMessage().startswith(EXPECTED_WARNINGS):
    return False
  record.exc_info, record.exc_text = None, None
  return True
