"""Predictors behind one interface: a fixed-batch inference function and the JSON to feed it.

A checkpoint predictor (training/serving.py) restores a workdir's checkpoint; an exported artifact
(`load_exported_predictor`) is a serialized `jax.export` function with its JSON, which runs
without the model code or the checkpoint. A config given beside a checkpoint must agree with the
checkpoint's on the fields that define the model and the score (`MODEL_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from privattnet_jax import nested
from privattnet_jax.data import attributes
from privattnet_jax.inference import heatmaps, preprocessing

EXPORT_FORMAT = "privattnet_jax.export/1"


EXPORT_FUNCTION_FILE = "predictor.jax_export"


EXPORT_INFO_FILE = "predictor.json"


DEFAULT_PLATFORMS = ("cpu", "cuda")


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # What jax.export lowers for.


# Config fields that define what a checkpoint computes: a --config given to predict or export
# must agree with the checkpoint's on these.
MODEL_FIELDS = ("input.image_size", "model", "score")


# Only where training started: not compared.
_INITIALISATION_FIELDS = ("model.encoder.pretrained", "model.attribute_bias_init")


DEFAULT_BATCH_SIZE = 32


_JAX_PLATFORMS = {"gpu": "cuda"}  # jax.default_backend() -> jax.export platform name.


class PredictError(ValueError):
  """The request cannot be served: a bad option, preference file or checkpoint, not one image."""


@dataclasses.dataclass
class Predictor:
  """A fixed-batch inference function and the settings to feed it and read its outputs.

  `info` is the export JSON (see `predictor_info`); `infer` maps images (B, S, S, 3) float32 with
  B = `batch_size` and a (B,) mask to numpy outputs (`score`, and `step_scores`, `attention`,
  `attribute_probabilities` where the model has them).
  """

  info: dict
  batch_size: int
  infer: Callable[[np.ndarray, np.ndarray], dict]

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs for up to `batch_size` images; the batch is padded so that it compiles once."""
    count = len(images)
    if not 0 < count <= self.batch_size:
      raise ValueError(f"a batch holds 1..{self.batch_size} images, got {count}")
    size = self.info["image_size"]
    padded = np.zeros((self.batch_size, size, size, 3), np.float32)
    padded[:count] = images
    mask = np.zeros((self.batch_size,), np.float32)
    mask[:count] = 1.0
    return {key: np.asarray(value)[:count] for key, value in self.infer(padded, mask).items()}


def builder_max_side(config) -> int:
  """The shorter-side limit of the checkpoint's dataset build (256 for max256, 0: original size)."""
  sides = preprocessing.BUILDER_MAX_SIDES
  name = config["data"]["builder_config"]
  if name not in sides:
    raise PredictError(f"data.builder_config {name!r} is not one of {sorted(sides)}")
  return int(sides[name])


def normalised(value):
  """A config value as the checkpoint's JSON metadata holds it (tuples as lists)."""
  return json.loads(json.dumps(value))


def check_config(given, stored: dict) -> None:
  """Fails, naming the fields, when a given config disagrees with a checkpoint's on MODEL_FIELDS."""
  given = normalised(given.to_dict())

  def field_value(config: dict, dotted: str):
    for name in dotted.split("."):
      config = config.get(name, "<absent>") if isinstance(config, dict) else "<absent>"
    return config

  differences = [
    f"{path}: --config has {a!r}, the checkpoint {b!r}"
    for field in MODEL_FIELDS
    for path, a, b in nested.nested_differences(
      field_value(given, field), field_value(stored, field), field, missing="<absent>"
    )
    if path not in _INITIALISATION_FIELDS
  ]
  if differences:
    raise PredictError(
      "the given config does not describe the checkpoint's model ("
      + "; ".join(differences)
      + "). Predict "
      "and export use the checkpoint's own config: drop --config, or give the same overrides as in training."
    )


def predictor_info(config: dict, task, step: int, output_shapes: dict) -> dict:
  """The JSON beside an exported predictor, and a checkpoint predictor's `info`.

  It says the preprocessing, the outputs, and how scores are read from them.
  """
  image_size = int(config["input"]["image_size"])
  outputs = {key: ["batch", *shape.shape[1:]] for key, shape in output_shapes.items()}
  grid_shape, steps = None, None
  if "attention" in output_shapes:
    steps, num_locations = output_shapes["attention"].shape[1:]
    grid_shape = list(heatmaps.infer_grid_shape(num_locations))  # Square images give square grids.
  info = {
    "format": EXPORT_FORMAT,
    "model": config["model"]["name"],
    "kind": task.kind,
    "step": int(step),
    "image_size": image_size,
    "max_side": builder_max_side(config),
    "image_mean": preprocessing.IMAGENET_MEAN.tolist(),
    "image_std": preprocessing.IMAGENET_STD.tolist(),
    "input": {
      "shape": ["batch", image_size, image_size, 3],
      "dtype": "float32",
      "description": "RGB resized to image_size squared (bilinear), (pixel / 255 - mean) / std",
    },
    "outputs": outputs,
    "grid_shape": grid_shape,
    "steps": steps,
    "target_mean": np.asarray(task.target_mean, np.float64).tolist(),
    "num_scores": int(output_shapes["score"].shape[1]),
    "score": normalised(config["score"]),
    # (68, P) in attributes.tsv order: the preferences the score column(s) were defined with;
    # attribute models pool their probabilities with it.
    "preferences": np.asarray(task.preferences, np.float64).tolist(),
    "attribute_ids": None,
    "config": normalised(config),
  }
  if "attribute_probabilities" in output_shapes:
    width = output_shapes["attribute_probabilities"].shape[1]
    info["attribute_ids"] = list(attributes.ATTRIBUTE_IDS[attributes.NUM_ATTRIBUTES - width :])
  return info


def output_shapes(infer: Callable, image_size: int) -> dict:
  return jax.eval_shape(infer, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


def load_exported_predictor(directory, batch_size: int = DEFAULT_BATCH_SIZE) -> Predictor:
  """An exported artifact as a Predictor: needs neither the model code nor the checkpoint."""
  directory = pathlib.Path(directory)
  function_path, info_path = directory / EXPORT_FUNCTION_FILE, directory / EXPORT_INFO_FILE
  for path in (function_path, info_path):
    if not path.is_file():
      raise PredictError(
        f"{path} does not exist: --exported wants the folder that --mode=export wrote"
      )
  info = json.loads(info_path.read_text())
  if info.get("format") != EXPORT_FORMAT:
    raise PredictError(f"{info_path}: format {info.get('format')!r}, expected {EXPORT_FORMAT!r}")
  if not np.allclose(info["image_mean"], preprocessing.IMAGENET_MEAN) or not np.allclose(
    info["image_std"], preprocessing.IMAGENET_STD
  ):
    raise PredictError(
      f"{info_path}: normalisation statistics differ from the input pipeline's ImageNet ones"
    )
  exported = jax.export.deserialize(bytearray(function_path.read_bytes()))
  platform = jax.default_backend()
  platform = _JAX_PLATFORMS.get(platform, platform)
  if platform not in exported.platforms:
    raise PredictError(
      f"{function_path} was exported for {list(exported.platforms)}, not for this {platform} "
      "backend: export again with --export_platforms including it"
    )
  call = jax.jit(exported.call)
  batch_size = max(int(batch_size), 1)

  def infer(images, mask):
    del mask  # Rows are independent in inference; padding rows are dropped by the caller.
    return jax.device_get(call(images))

  return Predictor(info, batch_size, infer)
