"""cli/errors.py, cli/logs.py, cli/usage.py: which errors are the user's, the one line, where the
traceback goes, which library log lines are dropped, which flags each mode needs.
tests/cli/test_faults.py checks the same through run.py end to end."""

import logging
import pathlib
import re

from absl import app
import pytest

from privattnet_jax.cli import errors
from privattnet_jax.cli import logs
from privattnet_jax.cli import usage
from privattnet_jax.data import vispr
from privattnet_jax.training import train
from privattnet_jax.training import workdir_lock
from privattnet_jax.data import vispr_layout


@pytest.mark.parametrize(
  "error, line",
  [
    (ValueError("batch_size=3 must be positive\nmore"), "batch_size=3 must be positive"),
    (FileNotFoundError("no such weight file"), "no such weight file"),
    (KeyError("no field 'x'"), "no field 'x'"),  # Its argument, not its repr.
    (app.UsageError("--mode=export needs --workdir"), "--mode=export needs --workdir"),
    (workdir_lock.WorkdirInUseError("in use by another run"), "in use by another run"),
    (train.NonFiniteLossError("loss is nan at step 3"), "loss is nan at step 3"),
    (vispr.StrictBuildError("strict build: 2 skipped\n a\n b"), "strict build: 2 skipped"),
    (
      vispr_layout.ManualDirError("no manual dir\nDownload it:\n  1. ..."),
      "no manual dir\nDownload it:",
    ),
    (TypeError("oops\nmore"), "internal error (TypeError): oops"),
    (RuntimeError(""), "internal error (RuntimeError): RuntimeError"),
  ],
)
def test_the_message_is_the_first_line_and_internal_errors_say_so(error, line):
  assert errors.message(error).startswith(line)
  if not isinstance(error, vispr_layout.ManualDirError):
    assert "\n" not in errors.message(error)


def test_a_full_disk_is_recognised_through_library_wrappers():
  wrapped = RuntimeError(
    'Failed to finalize writing of split "test": write() failed: No space left on device'
  )
  chained = ValueError("save failed")
  chained.__cause__ = OSError(28, "No space left on device", "/w/checkpoints/2/state")
  during = RuntimeError("finalize failed")  # Raised while handling the OSError.
  during.__context__ = OSError(28, "No space left on device")
  for error in (wrapped, chained, during, OSError(28, "No space left on device")):
    assert errors.is_disk_full(error)
    assert errors.message(error).startswith("no space left on the device")
    assert "training resumes from the last checkpoint" in errors.message(error)
  assert not errors.is_disk_full(ValueError("bad")) and not errors.is_disk_full(None)
  assert not errors.is_disk_full(OSError(13, "Permission denied"))


def _raised(error: Exception) -> Exception:
  try:
    raise error
  except Exception as caught:  # pylint: disable=broad-except
    return caught


def test_the_traceback_goes_to_errors_log_or_a_temporary_file(tmp_path):
  error = _raised(ValueError("bad value"))
  path = errors.save_traceback(error, str(tmp_path))
  assert path == str(tmp_path / "errors.log")
  errors.save_traceback(_raised(KeyError("second")), str(tmp_path))  # Appended.
  text = (tmp_path / "errors.log").read_text()
  assert text.count("Traceback") == 2 and "ValueError: bad value" in text
  elsewhere = pathlib.Path(errors.save_traceback(error, str(tmp_path / "missing")))
  try:
    assert (
      elsewhere.name.startswith("privattnet_jax-error-") and "bad value" in elsewhere.read_text()
    )
  finally:
    elsewhere.unlink()
  assert errors.save_traceback(None, str(tmp_path)) == ""


def test_fail_is_one_line_and_exit_status_1(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    errors.fail(_raised(TypeError("oops\nmore")), str(tmp_path), verbose=False)
  assert exit_.value.code == 1
  assert capsys.readouterr().err == (
    f"error: internal error (TypeError): oops (traceback in {tmp_path / 'errors.log'}; "
    "--verbosity=1 prints it)\n"
  )
  with pytest.raises(SystemExit):
    errors.fail(_raised(ValueError("bad")), str(tmp_path), verbose=True)
  err = capsys.readouterr().err
  assert "Traceback" in err and err.endswith("error: bad\n")
  with pytest.raises(SystemExit) as exit_:
    errors.usage_failure("--mode=train needs --workdir")
  assert exit_.value.code == 1
  assert capsys.readouterr().err == "error: --mode=train needs --workdir (see --helpshort)\n"


def _record(name, pathname, level, message, exc_info=None) -> logging.LogRecord:
  return logging.LogRecord(name, level, pathname, 1, message, None, exc_info)


def test_library_info_lines_and_restated_warnings_are_dropped(tmp_path):
  orbax = "/site-packages/orbax/checkpoint/manager.py"
  assert not logs.keep_record(_record("absl", orbax, logging.INFO, "Saved step 2"), None)
  assert not logs.keep_record(
    _record("absl", orbax, logging.WARNING, "Given directory is read only: /w"), None
  )
  error = _raised(OSError(28, "No space left on device"))
  warning = _record("absl", orbax, logging.ERROR, "write failed", (OSError, error, None))
  assert (
    logs.keep_record(warning, None) and warning.exc_info is None
  )  # The line, not its traceback.
  ours = _record("absl", "/repo/privattnet_jax/training/train.py", logging.INFO, "step 2", None)
  assert logs.keep_record(ours, None)
  abandoned = _record("asyncio", "/asyncio/base_events.py", logging.ERROR, "Task exception", None)
  abandoned.exc_info = (RuntimeError, _raised(RuntimeError("Event loop is closed")), None)
  assert not logs.keep_record(abandoned, str(tmp_path))
  assert "Event loop is closed" in (tmp_path / "errors.log").read_text()


def _flags(**values) -> dict:
  defaults = dict(
    mode="train", config=None, workdir=None, output=None, images=[], exported=None, workdirs=[]
  )
  return {**defaults, "redaction_quality": False, **values}


@pytest.mark.parametrize(
  "values, extra, message",
  [
    (_flags(config="c"), [], "--mode=train needs --workdir"),
    (_flags(mode="cache_features"), [], "--mode=cache_features needs --config and --workdir"),
    (_flags(config="c", workdir="w"), ["x.jpg"], "unexpected arguments: ['x.jpg']"),
    (
      _flags(config="c", workdir="w", redaction_quality=True),
      [],
      "--redaction_quality is a flag of --mode=evaluate",
    ),
    (_flags(mode="predict", workdir="w", output="o"), [], "--mode=predict needs --images"),
    (
      _flags(mode="redact", workdir="w", exported="e", output="o"),
      ["x.jpg"],
      "--mode=redact needs --workdir (a checkpoint) or --exported (an artifact), not both",
    ),
    (_flags(mode="compare", output="o"), [], "--mode=compare needs --workdirs"),
  ],
)
def test_a_mode_without_a_flag_it_needs_is_a_usage_error(values, extra, message):
  with pytest.raises(app.UsageError, match=f"^{re.escape(message)}$"):
    usage.check(values, extra)


def test_a_complete_command_line_passes_the_usage_check():
  usage.check(_flags(mode="predict", exported="e", output="o"), ["x.jpg", "y.jpg"])
  usage.check(_flags(mode="evaluate", config="c", workdir="w", redaction_quality=True), [])
  usage.check(_flags(mode="export", workdir="w"), [])
