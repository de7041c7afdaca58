"""Privacy risk for users' own photos: scores, per-step and per-profile scores, attributes, heat maps.

Two predictors behind one interface (`Predictor`):

* a checkpoint (`load_checkpoint_predictor`): the best or a named step of a workdir, restored from
  the checkpoint alone. Its metadata holds the config, the training target's mean and the
  preference table, so no dataset is built or read. The checkpoint's config is the one that
  counts; a config given as well must agree with it on the fields that define the model and the
  score (`MODEL_FIELDS`), and its other fields (data, optimiser, batch size) are ignored.
* an exported artifact (`export_predictor`, `load_exported_predictor`): a serialized `jax.export`
  function of a preprocessed image batch (batch dimension symbolic) with a JSON of everything
  else predict needs beside it, so it runs without the model code or the checkpoint.

Each photo goes through the dataset builder's normalisation (`vispr.process_image`: any Pillow
format and mode to RGB, EXIF orientation applied, transparency composited on white, 16-bit
scaled, the decompression-bomb limit, the builder config's downscale) and then the input
pipeline's eval transform (`input_pipeline.eval_image`): a photo reaches the model exactly as a
test image of the checkpoint's dataset did. A file that fails there (empty, not an image,
truncated, over the pixel limit) gets an error entry and the run goes on.

Scores: `score` is the model's own privacy score, the mean over profiles for a per-profile model
(whose 30 scores are listed too). `--profile=K` / `--preferences=FILE` add `user_score`, one
user's score: column K of a per-profile model, or, for attribute models, the predicted attribute
probabilities pooled with that user's preferences (`attributes.pooled_soft_score`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import glob
import json
import multiprocessing
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from privattnet_jax import attributes
from privattnet_jax import heatmaps
from privattnet_jax import input_pipeline
from privattnet_jax import safe_files
from privattnet_jax.data import vispr

EXPORT_FORMAT = "privattnet_jax.export/1"
EXPORT_FUNCTION_FILE = "predictor.jax_export"
EXPORT_INFO_FILE = "predictor.json"
DEFAULT_PLATFORMS = ("cpu", "cuda")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # What jax.export lowers for.
# Config fields that define what a checkpoint computes: a --config given to predict or export
# must agree with the checkpoint's on these.
MODEL_FIELDS = ("image_size", "half_precision", "model", "score")
# Only where training started: not compared.
_INITIALISATION_FIELDS = ("model.encoder.pretrained", "model.attribute_bias_init")
DEFAULT_BATCH_SIZE = 32
TOP_ATTRIBUTES = 5
# Reading and panel drawing run in threads (Pillow and numpy release the GIL): a GPU scores far
# more images per second than one thread reads and draws (docs/benchmarks.md, "On the GPU").
READ_THREADS = min(32, (os.cpu_count() or 1) + 4)
_BATCHES_IN_FLIGHT = 3
_JAX_PLATFORMS = {"gpu": "cuda"}  # jax.default_backend() -> jax.export platform name.


class PredictError(ValueError):
  """The request cannot be served (a bad option, preference file or checkpoint); not one image's fault."""


# ----------------------------------------------------------------------------
# Predictors.


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
  sides = {c.name: c.max_side for c in vispr.Vispr.BUILDER_CONFIGS}
  name = config["data"]["builder_config"]
  if name not in sides:
    raise PredictError(f"data.builder_config {name!r} is not one of {sorted(sides)}")
  return int(sides[name])


def _normalised(value):
  """A config value as the checkpoint's JSON metadata holds it (tuples as lists)."""
  return json.loads(json.dumps(value))


def check_config(given, stored: dict) -> None:
  """Fails, naming the fields, when a given config disagrees with a checkpoint's on MODEL_FIELDS."""
  given = _normalised(given.to_dict())
  differences = []

  def compare(prefix, a, b):
    if isinstance(a, dict) and isinstance(b, dict):
      for key in sorted(set(a) | set(b)):
        compare(
          f"{prefix}.{key}" if prefix else key, a.get(key, "<absent>"), b.get(key, "<absent>")
        )
    elif a != b and prefix not in _INITIALISATION_FIELDS:
      differences.append(f"{prefix}: --config has {a!r}, the checkpoint {b!r}")

  for field in MODEL_FIELDS:
    compare(field, given.get(field, "<absent>"), stored.get(field, "<absent>"))
  if differences:
    raise PredictError(
      "the given config does not describe the checkpoint's model ("
      + "; ".join(differences)
      + "). Predict "
      "and export use the checkpoint's own config: drop --config, or give the same overrides as in training."
    )


def predictor_info(config: dict, task, step: int, output_shapes: dict) -> dict:
  """The JSON beside an exported predictor (and a checkpoint predictor's `info`): preprocessing,
  outputs, and how scores are read from them."""
  image_size = int(config["image_size"])
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
    "image_mean": input_pipeline.IMAGENET_MEAN.tolist(),
    "image_std": input_pipeline.IMAGENET_STD.tolist(),
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
    "score": _normalised(config["score"]),
    # (68, P) in attributes.tsv order: the preferences the score column(s) were defined with;
    # attribute models pool their probabilities with it.
    "preferences": np.asarray(task.preferences, np.float64).tolist(),
    "attribute_ids": None,
    "config": _normalised(config),
  }
  if "attribute_probabilities" in output_shapes:
    width = output_shapes["attribute_probabilities"].shape[1]
    info["attribute_ids"] = list(attributes.ATTRIBUTE_IDS[attributes.NUM_ATTRIBUTES - width :])
  return info


def _inference_function(run) -> Callable:
  """images -> train_steps.inference_outputs, with the checkpoint's variables as constants (export)."""
  # Not at the top: an exported artifact runs without the model code (no import cycle here).
  from privattnet_jax import train_steps  # pylint: disable=g-import-not-at-top

  variables = jax.device_get({"params": run.state.params, "batch_stats": run.state.batch_stats})
  model, task = run.model.clone(), run.task

  def infer(images):
    return train_steps.inference_outputs(model.apply(variables, images, train=False), task)

  return infer


def _restore(workdir, step, config):
  # Not at the top: an exported artifact runs without the model code (no import cycle here).
  from privattnet_jax import train_steps  # pylint: disable=g-import-not-at-top

  run = train_steps.restore_checkpoint(workdir, step)
  if config is not None:
    check_config(config, _normalised(run.config.to_dict()))
  return run


def _output_shapes(infer: Callable, image_size: int) -> dict:
  return jax.eval_shape(infer, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


def load_checkpoint_predictor(
  workdir, step: int | None = None, config=None, batch_size: int = DEFAULT_BATCH_SIZE
) -> Predictor:
  """The best (or a named) checkpoint of `workdir` as a Predictor, run by the eval step
  (`train_steps.eval_step`) on every device; `batch_size` is rounded up to a multiple of the device
  count."""
  # Not at the top: an exported artifact runs without the model code (no import cycle here).
  from privattnet_jax import train_steps  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    raise PredictError("predict runs in a single process")
  run = _restore(workdir, step, config)
  info = predictor_info(
    _normalised(run.config.to_dict()),
    run.task,
    run.step,
    _output_shapes(_inference_function(run), run.config.image_size),
  )
  devices = jax.device_count()
  batch_size = -(-max(int(batch_size), 1) // devices) * devices
  eval_fn = train_steps.parallel_eval_step(run.mesh, run.task)
  num_scores = info["num_scores"]

  def infer(images, mask):
    # Users' photos have no targets: zeros fill the eval batch's score and labels.
    batch = {
      "image": images,
      "mask": mask,
      "score": np.zeros((len(images), num_scores), np.float32),
      "labels": np.zeros((len(images), attributes.NUM_ATTRIBUTES), np.float32),
    }
    outputs = jax.device_get(eval_fn(run.state, train_steps.shard_batch(batch, run.mesh)))
    outputs["score"] = outputs.pop("prediction")
    for key in ("target", "labels", "mask"):  # Echoed inputs, not predictions.
      outputs.pop(key)
    return outputs

  return Predictor(info, batch_size, infer)


def export_predictor(
  workdir,
  out_dir=None,
  step: int | None = None,
  config=None,
  platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> pathlib.Path:
  """Writes the checkpoint's inference function as a jax.export artifact plus its JSON.

  Input: float32 (batch, S, S, 3), preprocessed as the JSON says, the batch dimension symbolic.
  Outputs: train_steps.inference_outputs (score, step_scores, attention, attribute_probabilities, each
  where the model has it). Lowered for every platform in `platforms` (CPU and CUDA by default;
  lowering needs no such device). Returns the folder (default `workdir/export`).
  """
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise PredictError(f"export platforms must be some of {PLATFORMS}, got {list(platforms)}")
  out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(workdir) / "export"
  check_output_dir(out_dir)
  run = _restore(workdir, step, config)
  infer = _inference_function(run)
  size = run.config.image_size
  (batch,) = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(infer), platforms=tuple(platforms))(
    jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  )
  info = predictor_info(
    _normalised(run.config.to_dict()), run.task, run.step, _output_shapes(infer, size)
  )
  info["platforms"] = list(exported.platforms)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / EXPORT_FUNCTION_FILE).write_bytes(exported.serialize())
  (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
  logging.info(
    "Exported %s (checkpoint step %d) for %s to %s",
    info["model"],
    run.step,
    info["platforms"],
    out_dir,
  )
  return out_dir


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
  if not np.allclose(info["image_mean"], input_pipeline.IMAGENET_MEAN) or not np.allclose(
    info["image_std"], input_pipeline.IMAGENET_STD
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


# ----------------------------------------------------------------------------
# Whose score: the model's own, one profile's, or a user's own preferences.


@dataclasses.dataclass(frozen=True)
class UserScore:
  """One user's score from a predictor's outputs: a profile column, or pooled attribute probabilities."""

  label: str
  column: int | None = None  # Score column (per-profile or single-profile regression models).
  preferences: np.ndarray | None = None  # (68, 1), attribute models.
  pooling: str = "max"
  rule: str = "expected"  # attributes.ATTRIBUTE_RULES
  offset: int = (
    0  # Attribute columns the model lacks at the front (1: a0_safe, for privattnet_mlc).
  )

  def __call__(self, outputs: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(B,) scores and (B, T) per-step scores (None where the model has none for this user)."""
    if self.column is not None:
      steps = outputs.get("step_scores")
      return outputs["score"][:, self.column], None if steps is None else steps[:, :, self.column]
    probabilities = np.asarray(outputs["attribute_probabilities"], np.float64)
    scores = attributes.pooled_soft_score(
      probabilities, self.preferences[self.offset :], self.pooling, self.rule
    )
    return scores[:, 0], None


def _user_preference_table(path, missing_value: float) -> np.ndarray:
  """A user's ratings file -> (68, 1); one rating column, attributes it leaves out get `missing_value`."""
  try:
    safe_files.regular_file(path)
    if os.path.getsize(path) > safe_files.MAX_LIST_BYTES:
      raise safe_files.UnsafeFileError(
        "file_too_large", path, f"over {safe_files.MAX_LIST_BYTES} bytes"
      )
  except safe_files.UnsafeFileError as e:
    raise PredictError(
      f"--preferences={path}: {'no such file' if e.reason == 'missing' else e.message}"
    ) from None
  try:
    _, values = attributes.read_preference_tsv(path)
  except ValueError as error:
    raise PredictError(
      f"--preferences: {error}. Expected lines 'attribute_id<TAB>attribute_name<TAB>rating' (rating 1..5; "
      "optional header line starting with attribute_id), as in data/user_studies/user_profiles.tsv"
    ) from None
  if values.shape[1] != 1:
    raise PredictError(
      f"--preferences={path}: {values.shape[1]} rating columns; give one user's ratings "
      "(one column after attribute_id and attribute_name)"
    )
  return attributes.preference_table(
    "file", preferences_file=str(path), missing_value=missing_value
  )


def resolve_user(
  info: dict, profile: int | None = None, preferences_file: str | None = None
) -> UserScore | None:
  """Checks that the predictor can answer for this user, before any image is read."""
  if profile is None and not preferences_file:
    return None
  if profile is not None and preferences_file:
    raise PredictError("give --profile or --preferences, not both")
  model, score = info["model"], info["score"]
  if profile is not None and not 0 <= profile < attributes.NUM_PROFILES:
    raise PredictError(f"--profile must lie in 0..{attributes.NUM_PROFILES - 1}, got {profile}")
  if info["kind"] == "attributes":
    if profile is not None:
      table, label = (
        attributes.preference_table("profile", profile_index=profile),
        f"profile {profile}",
      )
    else:
      table, label = (
        _user_preference_table(preferences_file, score["missing_value"]),
        f"preferences {preferences_file}",
      )
    return UserScore(
      label,
      preferences=table.astype(np.float64),
      pooling=score["pooling"],
      rule=score.get("attribute_rule", "product"),  # Absent: a checkpoint from before the field.
      offset=attributes.NUM_ATTRIBUTES - len(info["attribute_ids"]),
    )
  trained_on = f"score.source={score['source']!r}" + (
    f", profile_index={score['profile_index']}" if score["source"] == "profile" else ""
  )
  if preferences_file:
    raise PredictError(
      f"{model} regresses the score it was trained on ({trained_on}, per_profile={score['per_profile']}); it "
      "cannot score new preferences. --preferences needs an attribute model (privattnet_mlc, ap_pr)"
      + (", or use --profile=K with this per-profile model" if info["num_scores"] > 1 else "")
    )
  if info["num_scores"] > 1:
    return UserScore(f"profile {profile}", column=profile)
  if score["source"] == "profile" and score["profile_index"] == profile:
    return UserScore(f"profile {profile}", column=0)
  raise PredictError(
    f"{model} predicts a single score ({trained_on}, per_profile=False) and has no output for profile "
    f"{profile}. Train with --config.score.per_profile=True for all 30 profiles, or use an attribute model "
    "(privattnet_mlc, ap_pr) for any user's preferences"
  )


# ----------------------------------------------------------------------------
# Finding and reading images.


def image_extensions() -> frozenset[str]:
  """File endings Pillow can open (lower case, with the dot): which files of a folder are read."""
  return frozenset(ext.lower() for ext in Image.registered_extensions())


def collect_images(specs: Iterable[str]) -> list[tuple[pathlib.Path, str | None]]:
  """Files, folders (recursive) and globs -> (path, error) in order, without repeats.

  Folders contribute files with an image ending (`image_extensions`); files named directly, or
  matched by a glob, are always tried. A name matching nothing is an entry with an error.
  """
  extensions = image_extensions()
  entries, seen = [], set()

  def add(path: pathlib.Path, error: str | None = None):
    key = path
    if error is None:
      try:
        key = safe_files.resolve(path)
      except safe_files.UnsafeFileError as e:  # A symlink loop: its own error entry.
        error = f"{e.reason}: {e.message}"
    if key not in seen:
      seen.add(key)
      entries.append((path, error))

  def add_folder(folder: pathlib.Path):
    for root, dirs, files in os.walk(folder):
      dirs.sort()
      for name in sorted(files):
        if pathlib.PurePath(name).suffix.lower() in extensions:
          add(pathlib.Path(root) / name)

  for spec in specs:
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
      add_folder(path)
    elif (
      path.exists() or path.is_symlink()
    ):  # A dangling or looping link: its reading error is the entry.
      add(path)
    elif glob.has_magic(spec):
      matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
      if not matches:
        add(path, "no file matches this pattern")
      for match in map(pathlib.Path, matches):
        add_folder(match) if match.is_dir() else add(match)
    else:
      add(path, "no such file or folder")
  return entries


@dataclasses.dataclass
class LoadedImage:
  model_input: np.ndarray  # float32 (S, S, 3)
  display: np.ndarray  # uint8 (h, w, 3), longer side <= panel_size, for the heat-map panel
  width: int  # As displayed (EXIF orientation applied), before any downscale.
  height: int
  conversions: list[str]


def load_image(
  path,
  *,
  image_size: int,
  max_side: int,
  max_pixels: int | None,
  panel_size: int = heatmaps.PANEL_SIZE,
) -> LoadedImage:
  """A photo -> the model's input, via the dataset builder's normalisation and the eval transform.

  Raises on an unreadable, empty, non-image, corrupt or too large file (`reason: message`), and
  on anything but a regular file (a FIFO, a device, a symlink loop) without reading it.
  """
  data = safe_files.read_bytes(path, max_bytes=safe_files.MAX_IMAGE_BYTES)
  return decode_image(
    data, image_size=image_size, max_side=max_side, max_pixels=max_pixels, panel_size=panel_size
  )


def decode_image(
  data: bytes, *, image_size: int, max_side: int, max_pixels: int | None, panel_size: int
) -> LoadedImage:
  """`load_image` on a file's bytes already read (redact decodes the same bytes at full size)."""
  if not data:
    raise ValueError("empty file")
  encoded, height, width, conversions = vispr.process_image(
    data, max_side=max_side, max_pixels=max_pixels
  )
  return LoadedImage(
    input_pipeline.eval_image(encoded, image_size),
    heatmaps.display_image(encoded, panel_size),
    int(width),
    int(height),
    list(conversions),
  )


def error_text(error: Exception) -> str:
  """`reason: message` (the builder's skip reasons), without Pillow's in-memory file repr."""
  return (
    re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)) or type(error).__name__
  )


# ----------------------------------------------------------------------------
# The predict loop.


@dataclasses.dataclass
class PredictResult:
  num_images: int
  num_failed: int
  records: list[dict]
  output_dir: pathlib.Path


def unique_names(paths: Sequence[pathlib.Path]) -> list[str]:
  """File stems, made unique in order (`x`, `x-2`, ...): the heat map file names.

  Unique over the whole run, also against stems that look generated (`x-2.jpg` and a second
  `x.jpg`) and regardless of case (case-insensitive file systems).
  """
  used: set[str] = set()
  names = []
  for path in paths:
    stem = path.stem or "image"
    name, suffix = stem, 1
    while name.lower() in used:
      suffix += 1
      name = f"{stem}-{suffix}"
    used.add(name.lower())
    names.append(name)
  return names


def _csv_header(info: dict, user: UserScore | None, top_attributes: int) -> list[str]:
  header = ["path", "name", "status", "error", "score"]
  if user is not None:
    header.append("user_score")
  header += [f"step_{t + 1}" for t in range(info["steps"] or 0) if "step_scores" in info["outputs"]]
  if info["num_scores"] > 1:
    header += [f"profile_{p}" for p in range(info["num_scores"])]
  if info["attribute_ids"] and top_attributes:
    header.append("top_attributes")
  return header + ["heatmap", "width", "height", "conversions"]


def _csv_row(record: dict, header: Sequence[str]) -> list:
  row = {"status": "ok" if record["ok"] else "error", **record}
  for t, value in enumerate(record.get("step_scores") or ()):
    row[f"step_{t + 1}"] = value
  for p, value in enumerate(record.get("profile_scores") or ()):
    row[f"profile_{p}"] = value
  if "top_attributes" in record:
    row["top_attributes"] = ";".join(
      f"{a['id']}:{a['probability']:.4f}" for a in record["top_attributes"]
    )
  row["conversions"] = ";".join(record.get("conversions", ()))
  return ["" if row.get(key) is None else row[key] for key in header]


def _image_records(
  info: dict, outputs: dict, user: UserScore | None, top_attributes: int
) -> list[dict]:
  """JSON-ready values of one batch: scores, per-step and per-profile scores, top attributes."""
  scores = np.asarray(outputs["score"], np.float64)
  steps = outputs.get("step_scores")
  user_scores, user_steps = user(outputs) if user is not None else (None, None)
  descriptions = {a.attribute_id: a.description for a in attributes.load_attributes()}
  records = []
  for i, row in enumerate(scores):
    record = {"score": float(row.mean())}  # Per-profile models: the mean over profiles.
    if user is not None:
      record["user"] = user.label
      record["user_score"] = float(user_scores[i])
      if user_steps is not None:
        record["user_step_scores"] = [float(v) for v in user_steps[i]]
    if steps is not None:
      record["step_scores"] = [float(v) for v in np.asarray(steps[i], np.float64).mean(axis=-1)]
    if len(row) > 1:
      record["profile_scores"] = [float(v) for v in row]
    if "attribute_probabilities" in outputs and top_attributes:
      probabilities = np.asarray(outputs["attribute_probabilities"][i], np.float64)
      order = np.argsort(-probabilities, kind="stable")[:top_attributes]
      record["top_attributes"] = [
        {
          "id": info["attribute_ids"][k],
          "description": descriptions[info["attribute_ids"][k]],
          "probability": float(probabilities[k]),
        }
        for k in order
      ]
    records.append(record)
  return records


def _panel_scores(record: dict) -> tuple[float, list[float] | None]:
  """What a panel shows: the user's score when one was asked for, else the model's."""
  if "user_score" in record:
    return record["user_score"], record.get("user_step_scores")
  return record["score"], record.get("step_scores")


def _write_panel(
  path: pathlib.Path,
  image: np.ndarray,
  attention,
  grid_shape,
  record: dict,
  *,
  normalisation: str,
  title: str,
) -> None:
  score, step_scores = _panel_scores(record)
  heatmaps.attention_panel(
    image,
    attention,
    grid_shape,
    score=score,
    step_scores=step_scores,
    normalisation=normalisation,
    title=title,
  ).save(path)


def predict(
  predictor: Predictor,
  images: Sequence[str],
  output_dir,
  *,
  profile: int | None = None,
  preferences_file: str | None = None,
  heatmap_panels: bool = True,
  normalisation: str = "per_map",
  top_attributes: int = TOP_ATTRIBUTES,
  max_pixels: int | None = None,
  panel_size: int = heatmaps.PANEL_SIZE,
  loader_processes: int = 0,
  progress: bool = True,
) -> PredictResult:
  """Scores every image; writes predictions.jsonl, predictions.csv and heatmaps/<name>_att.png.

  Args:
    predictor: from load_checkpoint_predictor or load_exported_predictor.
    images: file, folder or glob strings (see collect_images).
    output_dir: created if needed.
    profile, preferences_file: add `user_score` for one of the 30 profiles or a user's own ratings
      (see resolve_user); checked before any image is read.
    heatmap_panels: write a panel per image (attention models only).
    normalisation: `per_map` or `global` min-max scaling of the attention maps.
    top_attributes: how many of an attribute model's most probable attributes to list.
    max_pixels: refuse images above this many pixels (decompression bombs; JPEGs are decoded
      reduced instead); None: Pillow's Image.MAX_IMAGE_PIXELS.
    panel_size: longer side of each panel tile.
    loader_processes: read photos in this many worker processes (0: threads of this process);
      worth it for camera-size photos on a many-core host (see loader_pool).
    progress: show a tqdm progress bar.

  Returns:
    A PredictResult; `num_failed` counts the entries with an error (failed files and names that
    matched nothing).
  """
  if normalisation not in heatmaps.NORMALISATIONS:
    raise PredictError(
      f"heat map normalisation must be one of {heatmaps.NORMALISATIONS}, got {normalisation!r}"
    )
  if panel_size < 1 or top_attributes < 0 or predictor.batch_size < 1:
    raise PredictError(
      "panel_size and the batch size must be positive, top_attributes not negative"
    )
  info = predictor.info
  user = resolve_user(info, profile, preferences_file)
  entries = collect_images(images)
  if not entries:
    raise PredictError("no images given")
  output_dir = pathlib.Path(output_dir)
  check_output_dir(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  draw_panels = heatmap_panels and "attention" in info["outputs"]
  panels_dir = output_dir / "heatmaps"
  if draw_panels:
    panels_dir.mkdir(exist_ok=True)
  elif heatmap_panels:
    logging.info("%s has no attention: no heat maps", info["model"])
  max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
  names = unique_names([path for path, _ in entries])
  header = _csv_header(info, user, top_attributes)

  load = functools.partial(
    load_image,
    image_size=info["image_size"],
    max_side=info["max_side"],
    max_pixels=max_pixels,
    panel_size=panel_size,
  )

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  records = []
  saves = (
    collections.deque()
  )  # Panels being drawn; bounded, so that a slow disk cannot pile up images.
  with (
    open(output_dir / "predictions.jsonl", "w") as jsonl_file,
    open(output_dir / "predictions.csv", "w", newline="") as csv_file,
    concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool,
    loader_pool(loader_processes) or contextlib.nullcontext(pool) as loader,
    tqdm(total=len(entries), unit="img", disable=not progress, desc="predict") as bar,
  ):
    writer = csv.writer(csv_file)
    writer.writerow(header)
    for chunk in loaded_chunks(entries, names, load, predictor.batch_size, loader):
      good = [loaded for _, _, loaded in chunk if isinstance(loaded, LoadedImage)]
      outputs = predictor(np.stack([loaded.model_input for loaded in good])) if good else {}
      values = _image_records(info, outputs, user, top_attributes) if good else []
      index = 0
      for path, name, loaded in chunk:
        record = {"path": str(path), "name": name}
        if isinstance(loaded, LoadedImage):
          record.update(
            ok=True,
            **values[index],
            width=loaded.width,
            height=loaded.height,
            conversions=loaded.conversions,
          )
          if draw_panels:
            panel_path = panels_dir / f"{name}_att.png"
            record["heatmap"] = str(panel_path.relative_to(output_dir))
            saves.append(
              pool.submit(
                _write_panel,
                panel_path,
                loaded.display,
                outputs["attention"][index],
                info["grid_shape"],
                record,
                normalisation=normalisation,
                title=path.name,
              )
            )
          index += 1
        else:
          record.update(ok=False, error=loaded)
        records.append(record)
        jsonl_file.write(json.dumps(record) + "\n")
        writer.writerow(_csv_row(record, header))
        bar.update(1)
      jsonl_file.flush()
      csv_file.flush()
      while len(saves) > _BATCHES_IN_FLIGHT * predictor.batch_size:
        saves.popleft().result()
    for save in saves:
      save.result()
  failed = sum(not record["ok"] for record in records)
  logging.info("Predicted %d images (%d failed) into %s", len(records), failed, output_dir)
  return PredictResult(len(records), failed, records, output_dir)


def check_output_dir(output_dir: pathlib.Path) -> None:
  """Fails before any work when the output folder cannot be one (a file, under a file)."""
  for folder in (output_dir, *output_dir.parents):
    if folder.exists():
      if not folder.is_dir():
        raise PredictError(f"output folder {output_dir}: {folder} exists and is not a folder")
      return


def _load_or_error(load: Callable, path: pathlib.Path):
  """A LoadedImage, or the text of the error entry: any failure is this image's alone."""
  try:
    return load(path)
  except Exception as e:  # pylint: disable=broad-except
    return error_text(e)


def loader_pool(processes: int):
  """Worker processes for reading photos, or None (threads of this process).

  The builder's normalisation decodes under a process-wide lock (it sets Pillow's globals), so
  threads decode one photo at a time: about 120-155 1600 x 1200 JPEGs/s on a 16-core host
  however many threads; 15 processes reached 273/s there. Workers are spawned (JAX's threads
  make fork unsafe) and take seconds to start.
  """
  if processes <= 0:
    return None
  return concurrent.futures.ProcessPoolExecutor(
    processes, mp_context=multiprocessing.get_context("spawn")
  )


def loaded_chunks(entries, names, load, batch_size, executor):
  """Yields batches of (path, name, LoadedImage or error text), loading a few batches ahead."""
  pending = collections.deque()
  for start in range(0, len(entries), batch_size):
    chunk = [
      (path, name, error if error is not None else executor.submit(_load_or_error, load, path))
      for (path, error), name in zip(
        entries[start : start + batch_size], names[start : start + batch_size]
      )
    ]
    pending.append(chunk)
    if len(pending) > _BATCHES_IN_FLIGHT:
      yield _resolved(pending.popleft())
  while pending:
    yield _resolved(pending.popleft())


def _resolved(chunk):
  return [
    (path, name, item.result() if isinstance(item, concurrent.futures.Future) else item)
    for path, name, item in chunk
  ]
