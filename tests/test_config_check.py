"""config_check: every field's allowed values, the known-field list, and their agreement with the
modules that use them. The command line's one-line errors are in test_faults.py."""

import importlib
import math

import pytest

from configs import default, demo
from privattnet_jax import config_check, models
from privattnet_jax.data import attributes, synthetic, vispr
from privattnet_jax.models import attention, efficientnet, resnet
from privattnet_jax.training import feature_cache, feeds
from privattnet_jax.training import optimizer as optimizer_lib


def _set(config, field: str, value):
  *sections, name = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  with node.ignore_type():
    node[name] = value


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


@pytest.mark.parametrize(
  "name", ["default", "privattnet", "privattnet_mlc", "privnet", "ap_pr", "pr_cnn"]
)
def test_every_shipped_config_passes(name):
  config_check.check(importlib.import_module(f"configs.{name}").get_config())


@pytest.mark.parametrize("variant", [*demo.VARIANTS, *(f"{v},tiny" for v in demo.VARIANTS)])
def test_every_demo_variant_passes(variant):
  config_check.check(demo.get_config(variant))


def test_the_rules_are_the_default_configs_fields():
  known = set(config_check.RULES) - set(config_check.OPTIONAL_FIELDS)
  assert sorted(_leaves(default.get_config().to_dict())) == sorted(known)


def test_the_rules_allow_what_the_modules_accept():
  rules = config_check.RULES
  assert rules["model.name"].values == models.MODEL_NAMES  # The built-in variants.
  assert rules["model.encoder.name"].values == models.ENCODER_NAMES
  assert rules["model.encoder.batchnorm"].values == models.BATCHNORM_MODES
  assert rules["model.encoder.depth"].values == tuple(resnet.ARCHITECTURES)
  assert rules["model.encoder.stages"].values == tuple(efficientnet.CUT_STAGES)
  assert rules["model.attention.output"].values == attention.OUTPUT_MODES
  assert rules["feature_cache.mode"].values == feeds.MODES
  assert rules["feature_cache.dtype"].values == tuple(feature_cache.DTYPES)
  assert rules["feature_cache.splits"].choices == feature_cache.SPLITS == config_check.SPLITS
  assert rules["data.builder_config"].values == tuple(c.name for c in vispr.Vispr.BUILDER_CONFIGS)
  assert rules["data.synthetic.num_train"].maximum == synthetic.ID_SPLIT_STRIDE - 1
  assert rules["score.pooling"].values == attributes.POOLINGS
  config = default.get_config()
  for schedule in rules["optim.schedule"].values:  # Each builds an optimiser; others raise.
    config.optim.schedule = schedule
    optimizer_lib.create_optimizer(config.optim, config.model.encoder.trainable, {"head": {}}, 10)


def _numeric_fields():
  for field, rule in config_check.RULES.items():
    if isinstance(rule, (config_check.Integer, config_check.Number)):
      yield field, rule


@pytest.mark.parametrize("field, rule", list(_numeric_fields()))
def test_every_numeric_field_refuses_nan_inf_and_values_below_its_range(field, rule):
  bad = [math.nan, math.inf, -math.inf, "3"]
  if isinstance(rule, config_check.Integer):  # A float field turns True into 1.0 itself.
    bad += [True, 2.5]
  if rule.minimum is not None:
    bad.append(rule.minimum - (1 if isinstance(rule, config_check.Integer) else 1e-3))
  if rule.maximum is not None:
    bad.append(rule.maximum + (1 if isinstance(rule, config_check.Integer) else 0.5))
  for value in bad:
    config = default.get_config()
    _set(config, field, value)
    with pytest.raises(config_check.ConfigError) as error:
      config_check.check(config)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{field} must be ") and message.endswith(f"got {value!r}"), message


@pytest.mark.parametrize(
  "field, value, allowed",
  [
    ("num_train_steps", -5, "an integer >= -1 (-1 and 0: num_epochs decides)"),
    ("optim.learning_rate", 0.0, "a finite number > 0"),
    ("model.attention.dropout", 1.0, "a finite number in [0, 1)"),
    ("model.attention.feature_dropout", -0.1, "a finite number in [0, 1)"),
    ("loss.attention_tau_per_step", 1.5, "a finite number in [0, 1]"),
    ("input.crop_scale", (0.9, 0.1), "a pair (lo, hi) with lo <= hi"),
    ("input.crop_scale", (0.0, 1.0), "each a finite number in (0, 1]"),
    ("input.crop_ratio", (1.0, math.inf), "each a finite number > 0"),
    ("input.crop_ratio", (1.0,), "a pair (lo, hi)"),
    ("input.resize_size", -2, "-1 or an integer >= 1"),
    ("optim.schedule", "bogus", "one of ('constant', 'cosine', 'warmup_cosine')"),
    ("model.encoder.depth", 101, "one of (0, 18, 34, 50)"),
    ("model.encoder.stages", True, "one of (3, 4)"),
    ("score.source", "mine", "one of ('profiles_mean', 'profile', 'user_study_1', 'file')"),
    ("eval_splits", ("test", "dev"), "distinct names from ('train', 'validation', 'test')"),
    ("feature_cache.splits", (), "at least one"),
    ("data.strict", "yes", "True or False"),
    ("data.manual_dir", None, "a string"),
  ],
)
def test_a_bad_value_is_named_with_what_is_allowed(field, value, allowed):
  config = default.get_config()
  _set(config, field, value)
  with pytest.raises(config_check.ConfigError) as error:
    config_check.check(config)
  assert str(error.value).startswith(f"{field} must be ") and allowed in str(error.value)
  assert str(error.value).endswith(f"got {value!r}")


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"num_train_steps": -1, "num_epochs": 0}, "set num_train_steps > 0 or num_epochs > 0"),
    ({"score.source": "file"}, "score.source='file' needs score.preferences_file"),
    ({"score.per_profile": True, "score.source": "user_study_1"}, "needs the profile table"),
    ({"feature_cache.mode": "host", "model.encoder.trainable": True}, "trainable=False"),
    ({"feature_cache.mode": "device"}, "model.encoder.batchnorm='frozen', got 'update'"),
  ],
)
def test_fields_that_only_work_together_are_checked_together(changes, message):
  config = default.get_config()
  for field, value in changes.items():
    _set(config, field, value)
  with pytest.raises(config_check.ConfigError, match=message.replace("(", r"\(")):
    config_check.check(config)


def test_unknown_missing_and_replaced_fields_are_named():
  config = default.get_config()
  with config.unlocked():
    config.optim.lerning_rate = 1e-3
  with pytest.raises(config_check.ConfigError, match="optim.lerning_rate is not a config field; "):
    config_check.check(config)
  assert "did you mean optim.learning_rate" in config_check.problems(config)[0]
  config = default.get_config()
  del config.model.attention["dropout"]
  assert config_check.problems(config) == [
    "model.attention.dropout is missing (configs/default.py gives every field a value)"
  ]
  config = default.get_config()
  config.feature_cache.enabled = True
  assert config_check.problems(config)[0].startswith(
    "feature_cache.enabled was replaced by feature_cache.mode: 'off'"
  )


@pytest.mark.parametrize(
  "field, expected",
  [
    ("batch_sise", "did you mean input.batch_size?"),
    ("model.nonsens", "did you mean model.name"),
    ("learning_rate", "did you mean optim.learning_rate?"),
    ("nonsense", "the config has: checkpoint_every_steps, compilation_cache_dir, data,"),
    ("model.encoder.x", "did you mean model.encoder.name"),
    (
      "model.zzzzzzzz",
      "config.model has: attention, attribute_bias_init, encoder, half_precision, module, name,",
    ),
  ],
)
def test_an_unknown_override_names_the_closest_known_fields(field, expected):
  message = config_check.override_error(field)
  assert message.startswith(f"--config.{field} is not a config field; ") and expected in message
  assert config_check.override_error("optim.learning_rate") is None
  assert config_check.override_error("model") is None  # A section: ml_collections parses it.
