"""The command line and the config it names, each wrong value one line before any work.

`parse_flags` is run.py's flag parser (a bad flag, override or config file: one line, exit status
1); `load_config` loads the config file and checks it (`config_check`), before any dataset or
model work.
"""

from __future__ import annotations

import sys

import ml_collections
from absl import flags

from privattnet_jax import config_check, config_history


def parse_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for a bad flag or config file.

  ml_collections puts a config file's traceback into its message: its last line says what is wrong.
  """
  argv, renamed = config_history.rename_overrides(argv)
  for old in renamed:
    print(config_history.deprecation(old), file=sys.stderr, flush=True)
  if renamed:
    sys.argv[1:] = argv[1:]  # ml_collections defines the override flags from sys.argv.
  unknown = override_field_error(argv)
  if unknown:
    print(f"error: {unknown}", file=sys.stderr, flush=True)
    sys.exit(1)
  try:
    return flag_values(argv)
  except Exception as error:  # pylint: disable=broad-except  # ml_collections raises KeyError, OSError, ...
    print(f"error: {config_error_text(error)} (see --helpshort)", file=sys.stderr, flush=True)
    sys.exit(1)


def config_error_text(error: BaseException) -> str:
  """A flag or config-file error on one line.

  A config file's traceback (which ml_collections puts into its message) is reduced to its last
  line, the rest joined and cut to a readable length.
  """
  text = (
    str(error.args[0])
    if isinstance(error, (KeyError, AttributeError)) and error.args
    else str(error)
  )
  if isinstance(error.args[0] if error.args else None, KeyError):  # AttributeError(KeyError(...)).
    text = str(error.args[0].args[0])
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback" in text:
    lines = [lines[0], lines[-1]]
  text = " ".join(lines) or type(error).__name__
  return text if len(text) <= 400 else text[:400] + "..."


def load_config(config):
  """The --config flag's value, loaded and checked now; None without --config.

  ml_collections loads the file and applies overrides on first use; loading it here makes a missing
  file, an unknown field, a failing get_config or a refused value one line before any work.
  """
  if config is None:
    return None
  try:
    config.get("model")  # A config file that failed to load raises on first use.
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"--config: {config_error_text(error.__cause__ or error)}") from error
  with config.unlocked():
    for old in config_history.migrate(config, ml_collections.ConfigDict):
      print(config_history.deprecation(old), file=sys.stderr, flush=True)
  config_check.check(config)  # Every field's range, before anything compiles or reads data.
  return config


def override_field_error(argv: list[str]) -> str | None:
  """An override of a field the config lacks (or another replaced), with the closest known fields.

  Checked before flag parsing, where ml_collections would say only `'nonsense'`.
  """
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0]
    name = name[2:] if name.startswith("noconfig.") else name  # --noconfig.data.strict
    if arg.startswith("-") and name.startswith("config."):
      problem = config_check.override_error(name.removeprefix("config."))
      if problem:
        return problem
  return None
