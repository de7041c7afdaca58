"""From an evaluation pass to report.md / report.html, and several runs to one comparison table.

`evaluate_checkpoint` calls `localisation_summary` (boxes in the data: the synthetic set) and
`write_eval_report`; `--mode=compare` calls `compare_runs`. Rendering is report.py's; the heat-map
panels are heatmaps.py's, drawn on the split's own stored images, read back from the data source
by row (evaluation keeps the source's order in a single process) and checked by image id.

A per-profile model's report plots and ranks the mean over its 30 profile scores (its table row
holds the metrics averaged over profiles, as eval_<split>.json does).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from PIL import Image

from privattnet_jax.inference import heatmaps
from privattnet_jax.evaluation import localisation
from privattnet_jax.evaluation import report
from privattnet_jax.inference import preprocessing
from privattnet_jax.inference import predictor as predictor_lib

REPORT_EXAMPLES = 4  # Most and least risky images shown, each.
REDACTION_IMAGES = (
  48  # Risky images with boxes whose redaction is measured (a few model calls each).
)
NOT_METRICS = ("step", "model", "split")  # eval_<split>.json keys that are not metrics.


def localisation_summary(extras: Mapping) -> dict | None:
  """Localisation metrics of an attention model on data with boxes; None otherwise."""
  if "attention" not in extras or "num_boxes" not in extras or not np.any(extras["num_boxes"] > 0):
    return None
  return localisation.localisation_metrics(
    extras["attention"], extras["boxes"], extras["num_boxes"]
  )


def redaction_summary(
  extras: Mapping,
  source,
  infer,
  *,
  image_size: int,
  batch_size: int,
  model_name: str,
  max_images: int = REDACTION_IMAGES,
  examples: int = REPORT_EXAMPLES,
):
  """Redaction quality (`redaction_quality`) of an attention model on data with boxes.

  Measured on up to `max_images` images with boxes, spread evenly over the split, read back from
  the source as the heat-map examples are. `infer` maps (images, mask) to `score` and `attention`
  in batches of `batch_size`. Returns (summary, before/after panels) or None without attention
  or boxes.
  """
  # Imported here: only this opt-in measure needs them (scipy.ndimage, ImageCms: slow imports).
  from privattnet_jax.evaluation import redaction_quality  # pylint: disable=g-import-not-at-top
  from privattnet_jax.inference import redact, redaction  # pylint: disable=g-import-not-at-top

  if "attention" not in extras or "num_boxes" not in extras:
    return None
  rows = np.flatnonzero(np.asarray(extras["num_boxes"]) > 0)
  if not len(rows):
    return None
  rows = rows[
    np.unique(np.linspace(0, len(rows) - 1, min(max_images, len(rows))).round().astype(int))
  ]
  image_ids = [str(extras["image_id"][i]) for i in rows]
  pixels = np.stack(
    [
      redaction.model_pixels(
        preprocessing.eval_image(_stored_image(source, i, image_id), image_size)
      )
      for i, image_id in zip(rows, image_ids)
    ]
  )
  info = {
    "model": model_name,
    "image_size": image_size,
    "outputs": {"score": None, "attention": None},
  }
  score = redaction.scorer(predictor_lib.Predictor(info, batch_size, infer))
  grid_shape = heatmaps.infer_grid_shape(np.asarray(extras["attention"]).shape[-1])
  summary, greedy = redaction_quality.redaction_quality(
    score,
    pixels,
    np.asarray(extras["boxes"])[rows],
    np.asarray(extras["num_boxes"])[rows],
    grid_shape,
  )
  panels = []
  for k in np.argsort(-(greedy.before - greedy.after), kind="stable")[
    :examples
  ]:  # The largest drops.
    after = Image.fromarray(redaction.redact_array(pixels[k], greedy.masks[k]))
    panels.append(
      redact.before_after_panel(
        pixels[k],
        after,
        redaction.mask_regions(greedy.masks[k]),
        (image_size, image_size),
        score_before=greedy.before[k],
        score_after=greedy.after[k],
        area=float(greedy.areas[k]),
        title=image_ids[k],
      )
    )
  return summary, panels


def single_column(scores) -> np.ndarray:
  """(N,) scores; (N, P) per-profile scores become their mean over profiles."""
  scores = np.asarray(scores, np.float64)
  return scores.reshape(len(scores), -1).mean(axis=1)


def _stored_image(source, index: int, image_id: str) -> bytes:
  """The encoded image of row `index` of the split, checked against the evaluated id."""
  record = source[int(index)]
  stored_id = record["image_id"]
  stored_id = stored_id.decode("utf-8") if isinstance(stored_id, bytes) else str(stored_id)
  if stored_id != image_id:
    raise ValueError(
      f"evaluation row {index} is {image_id!r} but the source holds {stored_id!r} there"
    )
  return record["image"]


def report_dir(workdir, split: str) -> pathlib.Path:
  """Where a split's report goes: the workdir itself for test, else report_<split>/."""
  workdir = pathlib.Path(workdir)
  return workdir if split == "test" else workdir / f"report_{split}"


def write_eval_report(
  out_dir,
  *,
  method_name: str,
  split: str,
  summary: Mapping,
  extras: Mapping,
  predictions,
  targets,
  source,
  examples: int = REPORT_EXAMPLES,
  redaction_examples=(),
):
  """report.md + report.html for one evaluated split (see report.write_report).

  `extras` are EvalResult.extras of a single-process evaluation (they hold labels and image ids);
  `redaction_examples` are redaction_summary's panels.
  """
  predictions, targets = single_column(predictions), single_column(targets)
  image_ids = [str(i) for i in extras["image_id"]]
  attention, step_scores = extras.get("attention"), extras.get("step_scores")
  most, least = report.select_examples(predictions, examples)
  shown = []
  for kind, indices in (("most", most), ("least", least)):
    for index in indices:
      image = heatmaps.display_image(_stored_image(source, index, image_ids[index]))
      if attention is None:
        panel = image
      else:
        steps = None if step_scores is None else single_column(step_scores[index])  # (T,)
        panel = heatmaps.attention_panel(
          image,
          attention[index],
          score=predictions[index],
          step_scores=steps,
          title=image_ids[index],
        )
      shown.append(
        {
          "image_id": image_ids[index],
          "score": predictions[index],
          "target": targets[index],
          "panel": panel,
          "kind": kind,
        }
      )
  metrics = {k: v for k, v in summary.items() if k not in NOT_METRICS}
  return report.write_report(
    out_dir,
    method_name=method_name,
    metrics=metrics,
    predictions=predictions,
    targets=targets,
    labels=extras["labels"] > 0,
    examples=shown,
    localisation=summary.get("localisation"),
    split=split,
    redaction=summary.get("redaction"),
    redaction_examples=redaction_examples,
  )


def compare_runs(workdirs: Sequence[str], output, split: str = "test") -> pathlib.Path:
  """One markdown table of several runs' eval_<split>.json beside the paper's published rows."""
  if not workdirs:
    raise ValueError("--workdirs names no run")
  runs = []
  for workdir in workdirs:
    path = pathlib.Path(workdir) / f"eval_{split}.json"
    if not path.is_file():
      raise FileNotFoundError(
        f"{path} does not exist: run --mode=evaluate --split={split} on {workdir} first"
      )
    metrics = json.loads(path.read_text())
    name = pathlib.Path(workdir).absolute().name
    if metrics.get("model"):
      name = f"{metrics['model']} ({name})"
    runs.append((name, {k: v for k, v in metrics.items() if k not in NOT_METRICS}))
  return report.write_comparison(output, runs)
