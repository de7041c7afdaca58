"""cli/config_loading.py: one line for a bad flag, override or config file; replaced fields named."""

import pathlib

from absl import flags
from ml_collections import config_flags
import pytest

from configs import demo
from privattnet_jax import config_check
from privattnet_jax.cli import config_loading

DEMO = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo.py"


def _parse(argv: list[str]) -> flags.FlagValues:
  """run.py's parsing of `argv` with a --config flag on flags of its own."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  config_loading.parse_flags(flag_values, argv)
  return flag_values


@pytest.mark.parametrize(
  "field, line",
  [
    ("enabled", "mode=host (or off)"),
    ("on_device", "mode=device (or host)"),
  ],
)
def test_a_replaced_field_is_refused_on_the_command_line_and_in_a_config(field, line, capsys):
  argv = ["run.py", f"--config={DEMO}", f"--config.feature_cache.{field}=True"]
  with pytest.raises(SystemExit, match="1"):
    _parse(argv)
  assert capsys.readouterr().err == (
    f"error: --config.feature_cache.{field} was replaced by --config.feature_cache.{line}\n"
  )
  config = demo.get_config()
  config.feature_cache[field] = True  # As a config file that still sets it.
  with pytest.raises(
    ValueError,
    match=f"^feature_cache.{field} was replaced by feature_cache.mode: 'off'.*'host'.*'device'",
  ):
    config_loading.load_config(config)


def test_one_table_names_every_replaced_field_for_both_errors():
  for field, replacement in config_check.REPLACED_FIELDS.items():
    config = demo.get_config()
    section, name = field.rsplit(".", 1)
    config[section][name] = 1
    with pytest.raises(
      config_check.ConfigError, match=f"^{field} was replaced by feature_cache.mode"
    ):
      config_loading.load_config(config)
    assert config_loading.override_field_error(["run.py", f"--config.{field}=1"]) == (
      f"--config.{field} was replaced by --config.{replacement}"
    )
  assert config_loading.override_field_error(["run.py", "--config.feature_cache.mode=host"]) is None
  assert config_loading.load_config(demo.get_config()) is not None
  assert config_loading.load_config(None) is None


def test_a_bad_override_is_one_line_naming_the_closest_field(capsys):
  with pytest.raises(SystemExit, match="1"):
    _parse(["run.py", f"--config={DEMO}", "--config.batch_sise=8"])
  err = capsys.readouterr().err
  assert err == (
    "error: --config.batch_sise is not a config field; did you mean input.batch_size?\n"
  ), err


def test_a_config_file_that_does_not_load_is_one_line_on_first_use():
  missing = DEMO.with_name("nothere.py")
  flag_values = _parse(["run.py", f"--config={missing}"])
  with pytest.raises(ValueError) as error:
    config_loading.load_config(flag_values.config)
  assert str(error.value).startswith("--config: ") and "\n" not in str(error.value)
  assert f"No such file or directory: '{missing}'" in str(error.value)


def test_config_error_text_keeps_a_traceback_s_first_and_last_lines():
  traceback_text = (
    "Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
    '  File "configs/demo.py", line 3, in get_config\n    raise ValueError("x")\n'
    "ValueError: variant must be one of ('tiny',), got 'bogus'"
  )
  assert config_loading.config_error_text(ValueError(traceback_text)) == (
    "Error whilst parsing config file: ValueError: variant must be one of ('tiny',), got 'bogus'"
  )
  assert config_loading.config_error_text(KeyError("no field 'x'")) == "no field 'x'"
  nested = AttributeError(KeyError("no field 'y'"))  # As a locked ConfigDict raises.
  assert config_loading.config_error_text(nested) == "no field 'y'"
  assert config_loading.config_error_text(ValueError()) == "ValueError"
  long = config_loading.config_error_text(ValueError("z" * 1000))
  assert long == "z" * 400 + "..."
