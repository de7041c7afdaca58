"""How a run ends on an error: one line on stderr, exit status 1, the traceback in a file.

Errors that are the user's or the machine's (a bad request, a missing file, a full disk) read as
they are; any other is an "internal error". The traceback goes to `<workdir>/errors.log` (or a
temporary file), where the one line points, or to stderr with --verbosity=1. The tracebacks that
libraries' own threads and callbacks print go there too (`route_library_tracebacks_to_errors_log`).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import threading
import traceback
from typing import NoReturn

from absl import app

from privattnet_jax import config_check
from privattnet_jax.inference import output_folders


def expected_errors() -> tuple[type[Exception], ...]:
  """Errors that are the user's or the machine's, not the program's.

  Bad requests (PredictError, CheckpointError are ValueErrors), missing files, a diverged loss, a
  strict build that would skip, a workdir in use, a disk full. Every error ends the run with one
  line; these without "internal".
  """
  found = []
  for module, name in (
    ("privattnet_jax.training.train", "NonFiniteLossError"),
    ("privattnet_jax.data.vispr", "StrictBuildError"),
    ("privattnet_jax.training.workdir_lock", "WorkdirInUseError"),
  ):
    if module in sys.modules:
      found.append(getattr(sys.modules[module], name))
  return (OSError, ValueError, KeyError, app.UsageError, *found)


def message(error: BaseException) -> str:
  """The error's message for the user: its first line (the rest goes to the traceback file).

  The manual-dir instructions are the message whole.
  """
  if is_disk_full(error):
    return (
      f"no space left on the device ({first_line(error)}); free some and rerun: the checkpoints and "
      "data written so far are kept, and training resumes from the last checkpoint"
    )
  vispr_layout = sys.modules.get("privattnet_jax.data.vispr_layout")
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  if vispr_layout is not None and isinstance(error, vispr_layout.ManualDirError):
    return text
  text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  if not isinstance(error, expected_errors()):
    text = f"internal error ({type(error).__name__}): {text}"
  return text


def is_disk_full(error: BaseException | None) -> bool:
  """ENOSPC anywhere in the error's chain.

  Libraries (array_record, orbax) re-raise it as other types.
  """
  while error is not None:
    if (
      isinstance(error, OSError) and error.errno == errno.ENOSPC
    ) or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def save_traceback(error: BaseException | None, workdir: str | None) -> str:
  """Writes the traceback to <workdir>/errors.log (or a temporary file); returns the path.

  The run's one-line error points there.
  """
  if error is None:  # An unraisable report or thread exit without an exception.
    return ""
  text = "".join(traceback.format_exception(error))
  if workdir and os.path.isdir(workdir):
    path = os.path.join(workdir, "errors.log")
    try:
      with open(path, "a") as log:
        log.write(text)
      return path
    except OSError:  # The workdir's disk is full: try the temporary folder.
      pass
  try:
    fd, path = tempfile.mkstemp(prefix="privattnet_jax-error-", suffix=".log")
    with os.fdopen(fd, "w") as log:
      log.write(text)
    return path
  except OSError:  # Nowhere to write: --verbosity=1 prints it.
    return ""


def route_library_tracebacks_to_errors_log(workdir: str | None) -> None:
  """Tracebacks that libraries' own threads and callbacks print go to errors.log, not stderr.

  A corrupt checkpoint makes orbax give up a restore and close its event loop while TensorStore's
  reads are still in flight: each read that finishes then fails in its callback (thousands of
  'Event loop is closed' tracebacks through sys.excepthook), and asyncio reports the abandoned
  tasks and coroutines (its logger, sys.unraisablehook). The run's own one-line error says what
  happened; these tracebacks join its traceback in errors.log. A Python thread that dies of an
  exception still says so on stderr, in one line.
  """
  sys.excepthook = lambda kind, error, trace: save_traceback(error.with_traceback(trace), workdir)
  sys.unraisablehook = lambda unraisable: save_traceback(unraisable.exc_value, workdir)
  threading.excepthook = lambda hook_args: _report_thread_failure(hook_args, workdir)


def _report_thread_failure(hook_args, workdir: str | None) -> None:
  """threading.excepthook: one warning line on stderr, the traceback in errors.log."""
  if hook_args.exc_value is None or isinstance(hook_args.exc_value, SystemExit):
    return
  path = save_traceback(hook_args.exc_value, workdir)
  name = hook_args.thread.name if hook_args.thread is not None else "a thread"
  where = f" (traceback in {path})" if path else ""
  print(
    f"warning: background thread {name} failed: "
    f"{type(hook_args.exc_value).__name__}: {first_line(hook_args.exc_value)}{where}",
    file=sys.stderr,
    flush=True,
  )


def fail(error: BaseException, workdir: str | None, *, verbose: bool) -> NoReturn:
  """Ends the process with exit status 1 and one line on stderr.

  The traceback goes to a file, or to stderr when `verbose` (--verbosity=1).
  """
  if isinstance(error, (config_check.ConfigError, output_folders.OutputFolderError)):
    print(f"error: {error}", file=sys.stderr, flush=True)  # The line says it all.
    sys.exit(1)
  if verbose:
    traceback.print_exception(error)
    where = ""
  else:
    path = save_traceback(error, workdir)
    where = f" (traceback in {path}; --verbosity=1 prints it)" if path else ""
  print(f"error: {message(error)}{where}", file=sys.stderr, flush=True)
  sys.exit(1)


def usage_failure(text: str) -> NoReturn:
  """Ends the process on a bad command line: one line pointing at --helpshort, exit status 1.

  absl would print the module docstring too.
  """
  print(f"error: {text} (see --helpshort)", file=sys.stderr, flush=True)
  sys.exit(1)
