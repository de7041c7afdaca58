"""run.py's modes but train and evaluate, from plain values: what each prints, its exit status.

The library modules are imported inside the functions: grain worker processes re-import run.py
(and so this module), and --exported runs need no model code.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import app


def check_output_dir(output: str, images: Sequence[str], preferences, workdir, exported) -> None:
  """Fails before any work when predict's or redact's output folder cannot be one.

  It cannot be a file, nor a folder that is or holds what the run reads (nothing read is written
  over, nothing written read).
  """
  from privattnet_jax.inference import output_folders  # pylint: disable=g-import-not-at-top
  from privattnet_jax.inference import predict  # pylint: disable=g-import-not-at-top

  predict.check_output_dir(pathlib.Path(output))
  output_folders.check(
    output,
    [*images, *([preferences] if preferences else [])],
    output_folders.workdir_reads(workdir) if workdir else [exported],
  )


def load_predictor(workdir, exported, step, config, batch_size):
  """The --exported artifact or the --workdir checkpoint, as predict and redact run it."""
  if exported:
    from privattnet_jax.inference import predictor as predictor_lib  # pylint: disable=g-import-not-at-top

    if config is not None or step is not None:
      raise app.UsageError(
        "--exported runs the artifact as exported: --config and --step do not apply"
      )
    return predictor_lib.load_exported_predictor(exported, batch_size)
  from privattnet_jax.training import serving  # pylint: disable=g-import-not-at-top

  return serving.load_checkpoint_predictor(workdir, step, config, batch_size)


def predict(
  images: Sequence[str],
  config,
  *,
  workdir,
  exported,
  step,
  batch_size,
  output,
  profile,
  preferences,
  heatmaps,
  heatmap_normalisation,
  top_attributes,
  max_pixels,
  panel_size,
  loader_processes,
) -> int:
  """Returns the process exit status: 1 when any image failed (its entry says why)."""
  from privattnet_jax.inference import predict as predict_lib  # pylint: disable=g-import-not-at-top

  result = predict_lib.predict(
    load_predictor(workdir, exported, step, config, batch_size),
    images,
    output,
    profile=profile,
    preferences_file=preferences,
    heatmap_panels=heatmaps,
    normalisation=heatmap_normalisation,
    top_attributes=top_attributes,
    max_pixels=max_pixels,
    panel_size=panel_size,
    loader_processes=loader_processes,
    progress=sys.stderr.isatty(),
  )
  done = f"images scored; predictions in {result.output_dir}"
  return _exit_status(result, done, result.output_dir / "predictions.jsonl")


def redact(
  images: Sequence[str],
  config,
  *,
  workdir,
  exported,
  step,
  batch_size,
  output,
  profile,
  preferences,
  heatmaps,
  max_pixels,
  panel_size,
  loader_processes,
  method,
  target_score,
  target_drop,
  max_area,
  keep_metadata,
) -> int:
  """Returns the process exit status: 1 when any image failed (its entry says why)."""
  from privattnet_jax.inference import redact as redact_lib  # pylint: disable=g-import-not-at-top

  settings = redact_lib.RedactSettings(
    method=method,
    target_score=target_score,
    target_drop=target_drop,
    max_area=max_area,
    keep_metadata=keep_metadata,
  )
  settings.check()  # Before the checkpoint is restored.
  result = redact_lib.redact_photos(
    load_predictor(workdir, exported, step, config, batch_size),
    images,
    output,
    settings,
    profile=profile,
    preferences_file=preferences,
    panels=heatmaps,
    max_pixels=max_pixels,
    panel_size=panel_size,
    loader_processes=loader_processes,
    progress=sys.stderr.isatty(),
  )
  done = f"images redacted into {result.output_dir}"
  return _exit_status(result, done, result.output_dir / "redaction.jsonl")


def _exit_status(result, done: str, rows_file: pathlib.Path) -> int:
  """Prints how many images went through; 1 when any failed (its row in `rows_file` says why)."""
  print(f"{result.num_images - result.num_failed} of {result.num_images} {done}", flush=True)
  if result.num_failed:
    print(f"error: {result.num_failed} images failed (see 'error' in {rows_file})", file=sys.stderr)
    return 1
  return 0


def export(workdir, output, step, config, platforms: Sequence[str]) -> int:
  """Writes the jax.export predictor of a checkpoint; prints where."""
  from privattnet_jax.training import serving  # pylint: disable=g-import-not-at-top

  print(f"wrote {serving.export_predictor(workdir, output, step, config, platforms)}")
  return 0


def compare(workdirs: Sequence[str], output, split: str) -> int:
  """Tabulates the runs' evaluations of `split` into a markdown file; prints where."""
  from privattnet_jax.evaluation import evaluation_report  # pylint: disable=g-import-not-at-top

  print(f"wrote {evaluation_report.compare_runs(workdirs, output, split)}")
  return 0


def cache_features(config, workdir) -> int:
  """Builds (or checks) the feature cache a run of `config` reads; prints where and its size."""
  from privattnet_jax.training import experiment  # pylint: disable=g-import-not-at-top

  cache = experiment.prepare_feature_cache(config, workdir)
  print(
    f"feature cache ready in {cache.directory}: {cache.bytes_per_record() / 1e3:.0f} KB per record",
    flush=True,
  )
  return 0
