"""Privacy risk of users' own photos: scores, per-step and per-profile, attributes, heat maps.

The photos are scored by a `predictor_lib.Predictor`: a checkpoint's (training/serving.py) or an
exported artifact's.

Each photo goes through the dataset builder's normalisation (`preprocessing.process_image`: any Pillow
format and mode to RGB, EXIF orientation applied, transparency composited on white, 16-bit
scaled, the decompression-bomb limit, the builder config's downscale) and then the input
pipeline's eval transform (`preprocessing.eval_image`): a photo reaches the model exactly as a
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
import io
import json
import multiprocessing
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence

from absl import logging
import numpy as np
from PIL import Image

from privattnet_jax.data import attributes
from privattnet_jax.inference import heatmaps
from privattnet_jax import safe_files
from privattnet_jax.inference import output_folders
from privattnet_jax.inference import preprocessing
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.inference import user_scores


TOP_ATTRIBUTES = 5


# Reading and panel drawing run in threads (Pillow and numpy release the GIL): a GPU scores far
# more images per second than one thread reads and draws (docs/benchmarks.md, "Figures behind
# constants" and "On the GPU").
READ_THREADS = min(32, (os.cpu_count() or 1) + 4)


_BATCHES_IN_FLIGHT = 3


def image_extensions() -> frozenset[str]:
  """File endings Pillow can open (lower case, with the dot): which files of a folder are read."""
  return frozenset(ext.lower() for ext in Image.registered_extensions())


def collect_images(specs: Iterable[str], output_dir=None) -> list[tuple[pathlib.Path, str | None]]:
  """Files, folders (recursive) and globs -> (path, error) in order, without repeats.

  Folders contribute files with an image ending (`image_extensions`); files named directly, or
  matched by a glob, are always tried. A name matching nothing is an entry with an error. Folder
  walks and globs pass over `output_dir` and earlier runs' outputs (`output_folders.Scan`).
  """
  extensions = image_extensions()
  entries, seen = [], set()
  scan = output_folders.Scan(output_dir, extensions)

  def add(path: pathlib.Path, error: str | None = None):
    key = path
    if error is None:
      try:
        key = safe_files.resolve(path)
      except safe_files.UnsafeFileError as e:  # A symlink loop: its own error entry.
        error = f"{e.reason}: {e.message}"
      else:
        error = scan.refuse(path, key)
    if key not in seen:
      seen.add(key)
      entries.append((path, error))

  def add_folder(folder: pathlib.Path, base: pathlib.Path):
    for root, dirs, files in os.walk(folder):
      dirs[:] = [d for d in sorted(dirs) if not scan.skip_folder(pathlib.Path(root) / d, base)]
      for name in sorted(files):
        if pathlib.PurePath(name).suffix.lower() in extensions:
          add(pathlib.Path(root) / name)

  for spec in specs:
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
      if not scan.skip_folder(path, path):
        add_folder(path, path)
    elif (
      path.exists() or path.is_symlink()
    ):  # A dangling or looping link: its reading error is the entry.
      add(path)
    elif glob.has_magic(spec):
      base = output_folders.spec_root(spec)
      matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
      if not matches:
        add(path, "no file matches this pattern")
      for match in map(pathlib.Path, matches):
        if match.is_dir():
          if not scan.skip_below(match, base):
            add_folder(match, base)
        elif not scan.skip_below(match.parent, base):
          add(match)
    else:
      add(path, "no such file or folder")
  for folder in scan.skipped:
    logging.info("Not read: %s", folder)
  return entries


@dataclasses.dataclass
class LoadedImage:
  model_input: np.ndarray  # float32 (S, S, 3)
  display: np.ndarray  # uint8 (h, w, 3), longer side <= panel_size, for the heat-map panel
  width: int  # As displayed (EXIF orientation applied), before any downscale.
  height: int
  conversions: list[str]
  frames: int = 1  # Of an animation or multi-image file; the model sees the first.


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
  return load_image_bytes(
    data, image_size=image_size, max_side=max_side, max_pixels=max_pixels, panel_size=panel_size
  )


def load_image_bytes(
  data: bytes, *, image_size: int, max_side: int, max_pixels: int | None, panel_size: int
) -> LoadedImage:
  """`load_image` on a file's bytes already read (redact decodes the same bytes at full size)."""
  if not data:
    raise ValueError("empty file")
  encoded, height, width, conversions = preprocessing.process_image(
    data, max_side=max_side, max_pixels=max_pixels
  )
  frames = 1
  if "first_frame" in conversions:
    with preprocessing.pil_checks_ours():
      frames = preprocessing.frame_count(Image.open(io.BytesIO(data)))
  return LoadedImage(
    preprocessing.eval_image(encoded, image_size),
    heatmaps.display_image(encoded, panel_size),
    int(width),
    int(height),
    list(conversions),
    frames,
  )


def error_text(error: Exception) -> str:
  """`reason: message` (the builder's skip reasons), without Pillow's in-memory file repr."""
  return (
    re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)) or type(error).__name__
  )


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


def _csv_header(info: dict, user: user_scores.UserScore | None, top_attributes: int) -> list[str]:
  header = ["path", "name", "status", "error", "score"]
  if user is not None:
    header.append("user_score")
  header += [f"step_{t + 1}" for t in range(info["steps"] or 0) if "step_scores" in info["outputs"]]
  if info["num_scores"] > 1:
    header += [f"profile_{p}" for p in range(info["num_scores"])]
  if info["attribute_ids"] and top_attributes:
    header.append("top_attributes")
  return header + ["heatmap", "width", "height", "frames", "conversions"]


def csv_row(record: dict, header: Sequence[str], columns: dict) -> list:
  """A JSONL record as a CSV row in `header` order (None blank); predict's table and redact's.

  `columns` are the record's fields rewritten for the table; `status` and the `;`-joined
  `conversions` are common to both.
  """
  row = {"status": "ok" if record["ok"] else "error", **record, **columns}
  row["conversions"] = ";".join(record.get("conversions", ()))
  return ["" if row.get(key) is None else row[key] for key in header]


def _csv_columns(record: dict) -> dict:
  """predict's table columns: one per step and profile, the top attributes joined."""
  columns = {f"step_{t + 1}": value for t, value in enumerate(record.get("step_scores") or ())}
  columns.update(
    (f"profile_{p}", value) for p, value in enumerate(record.get("profile_scores") or ())
  )
  if "top_attributes" in record:
    columns["top_attributes"] = ";".join(
      f"{a['id']}:{a['probability']:.4f}" for a in record["top_attributes"]
    )
  return columns


def _image_records(
  info: dict, outputs: dict, user: user_scores.UserScore | None, top_attributes: int
) -> list[dict]:
  """JSON-ready values of one batch: scores, per-step and per-profile scores, top attributes."""
  scores = np.asarray(outputs["score"], np.float64)
  steps = outputs.get("step_scores")
  user_values, user_steps = user(outputs) if user is not None else (None, None)
  descriptions = {a.attribute_id: a.description for a in attributes.load_attributes()}
  records = []
  for i, row in enumerate(scores):
    record = {"score": float(row.mean())}  # Per-profile models: the mean over profiles.
    if user is not None:
      record["user"] = user.label
      record["user_score"] = float(user_values[i])
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
  predictor: predictor_lib.Predictor,
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
      (see user_scores.resolve_user); checked before any image is read.
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
    raise predictor_lib.PredictError(
      f"heat map normalisation must be one of {heatmaps.NORMALISATIONS}, got {normalisation!r}"
    )
  if panel_size < 1 or top_attributes < 0 or predictor.batch_size < 1:
    raise predictor_lib.PredictError(
      "panel_size and the batch size must be positive, top_attributes not negative"
    )
  info = predictor.info
  user = user_scores.resolve_user(info, profile, preferences_file)
  output_dir = pathlib.Path(output_dir)
  check_output_dir(output_dir)
  output_folders.check(output_dir, [*images, *([preferences_file] if preferences_file else [])])
  entries = collect_images(images, output_dir)
  if not entries:
    raise predictor_lib.PredictError("no images given")
  inputs = output_folders.input_paths(entries, [preferences_file])
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
    open(output_folders.claim(output_dir / "predictions.jsonl", inputs), "w") as jsonl_file,
    open(output_folders.claim(output_dir / "predictions.csv", inputs), "w", newline="") as csv_file,
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
            frames=loaded.frames,
          )
          if draw_panels:
            panel_path = output_folders.claim(panels_dir / f"{name}_att.png", inputs)
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
        writer.writerow(csv_row(record, header, _csv_columns(record)))
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
        raise predictor_lib.PredictError(
          f"output folder {output_dir}: {folder} exists and is not a folder"
        )
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
  threads decode one photo at a time however many there are; processes decode in parallel, which
  pays for camera-size photos on a many-core host (docs/benchmarks.md, "On the GPU"; threads gave
  120-155 1600 x 1200 JPEGs/s on its 16-core host). Workers are spawned (JAX's threads make fork
  unsafe) and take seconds to start.
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
