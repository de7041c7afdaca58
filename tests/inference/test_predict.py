"""Predict on users' photos (formats, broken files, heat maps, profiles, preferences), the evaluation
report and the comparison of runs, on two tiny models trained once for this module."""

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps

from privattnet_jax.data import attributes
from privattnet_jax.evaluation import evaluation_report
from privattnet_jax.inference import heatmaps
from privattnet_jax.inference import predict
from privattnet_jax.training import evaluator
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.training import serving
from privattnet_jax.inference import user_scores
from tests import tiny_runs
from tests.conftest import make_tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 3  # The tiny config's attention steps.


@pytest.fixture(scope="module")
def runs(tiny_data_dir, tmp_path_factory):
  """A per-profile PrivAttNet (attention, 30 profile scores) and an AP-PR (68 attribute probabilities),
  each trained two steps and evaluated on the test split (report.md)."""
  root = tmp_path_factory.mktemp("predict_runs")
  return {
    "profiles": tiny_runs.train_tiny_run(
      tiny_data_dir, root / "privattnet", "privattnet", per_profile=True, eval_splits=("test",)
    ),
    "attributes": tiny_runs.train_tiny_run(
      tiny_data_dir, root / "ap_pr", "ap_pr", eval_splits=("test",)
    ),
  }


@pytest.fixture(scope="module")
def profile_predictor(runs):
  return serving.load_checkpoint_predictor(runs["profiles"], batch_size=4)


@pytest.fixture(scope="module")
def attribute_predictor(runs):
  return serving.load_checkpoint_predictor(runs["attributes"], batch_size=4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  return tiny_runs.write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def mixed_result(profile_predictor, photos, tmp_path_factory):
  out = tmp_path_factory.mktemp("mixed_out")
  return predict.predict(profile_predictor, [str(photos)], out, progress=False)


def _by_name(result):
  return {pathlib.Path(r["path"]).name: r for r in result.records}


# ----------------------------------------------------------------------------
# A folder of good and broken files.


def test_every_good_format_is_scored_and_every_broken_file_gets_an_error(mixed_result, photos):
  records = _by_name(mixed_result)
  assert set(records) == {
    pathlib.Path(n).name for n in (*tiny_runs.GOOD, *tiny_runs.BROKEN)
  }  # notes.txt passed over
  assert mixed_result.num_images == len(records) and mixed_result.num_failed == len(
    tiny_runs.BROKEN
  )
  for name, (_, word) in tiny_runs.BROKEN.items():
    assert records[name]["ok"] is False and word in records[name]["error"], records[name]
    assert "score" not in records[name]
  for name, (_, (width, height), conversions) in tiny_runs.GOOD.items():
    record = records[pathlib.Path(name).name]
    assert record["ok"] is True, record
    assert (record["width"], record["height"]) == (width, height), name
    assert record["conversions"] == conversions, name
    assert math.isfinite(record["score"])
    assert (
      len(record["step_scores"]) == STEPS
      and len(record["profile_scores"]) == attributes.NUM_PROFILES
    )
    assert record["score"] == pytest.approx(np.mean(record["profile_scores"]), rel=1e-6)
  # Paths and names are unique, in folder order, with the nested folder read too.
  assert records["inner.jpg"]["path"] == str(photos / "nested" / "deeper" / "inner.jpg")


def test_jsonl_and_csv_hold_the_same_entries(mixed_result):
  out = mixed_result.output_dir
  lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert lines == mixed_result.records
  with open(out / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [row["path"] for row in rows] == [r["path"] for r in lines]
  assert list(rows[0])[:5] == ["path", "name", "status", "error", "score"]
  assert {f"step_{t}" for t in range(1, STEPS + 1)} | {"profile_0", "profile_29"} <= set(rows[0])
  for row, record in zip(rows, lines):
    assert row["status"] == ("ok" if record["ok"] else "error")
    if record["ok"]:
      assert float(row["score"]) == pytest.approx(record["score"])
      assert float(row["profile_29"]) == pytest.approx(record["profile_scores"][29])
    else:
      assert row["error"] == record["error"] and row["score"] == ""


def test_heat_map_panels_have_one_tile_per_step_at_the_photo_size(mixed_result):
  for record in mixed_result.records:
    if not record["ok"]:
      continue
    panel = Image.open(mixed_result.output_dir / record["heatmap"])
    assert record["heatmap"] == f"heatmaps/{record['name']}_att.png"
    width, height = record["width"], record["height"]  # Smaller than the panel size: kept.
    assert panel.size == (width * (STEPS + 1), height + 2 * heatmaps.CAPTION_HEIGHT), record["name"]
  # The transparent half of rgba.png is composited on white, as the dataset builder does.
  rgba = _by_name(mixed_result)["rgba.png"]
  tile = np.asarray(Image.open(mixed_result.output_dir / rgba["heatmap"]).convert("RGB"))
  image = tile[2 * heatmaps.CAPTION_HEIGHT :, : rgba["width"]]
  assert image[:, -8:].min() > 240 and image[:, :8].min() < 200


def test_heat_map_normalisation_option_changes_the_overlays(profile_predictor, photos, tmp_path):
  per_map = predict.predict(
    profile_predictor, [str(photos / "photo.jpg")], tmp_path / "per_map", progress=False
  )
  overall = predict.predict(
    profile_predictor,
    [str(photos / "photo.jpg")],
    tmp_path / "global",
    normalisation="global",
    progress=False,
  )
  assert per_map.records[0]["score"] == overall.records[0]["score"]
  a = np.asarray(Image.open(tmp_path / "per_map" / "heatmaps" / "photo_att.png"))
  b = np.asarray(Image.open(tmp_path / "global" / "heatmaps" / "photo_att.png"))
  assert a.shape == b.shape and not np.array_equal(a, b)
  with pytest.raises(predictor_lib.PredictError, match="normalisation"):
    predict.predict(
      profile_predictor, [str(photos / "photo.jpg")], tmp_path / "bad", normalisation="local"
    )


def test_exif_orientation_is_applied_before_the_model_sees_the_photo(tmp_path):
  stored = tiny_runs.photo(seed=4)
  (tmp_path / "rotated.jpg").write_bytes(tiny_runs.exif_rotated_jpeg(stored))
  upright = ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg"))
  upright.save(tmp_path / "upright.png")
  Image.open(tmp_path / "rotated.jpg").save(tmp_path / "stripped.png")  # Pixels as stored, no EXIF.
  load = lambda name: predict.load_image(
    tmp_path / name, image_size=32, max_side=256, max_pixels=None
  )
  rotated, reference, stripped = load("rotated.jpg"), load("upright.png"), load("stripped.png")
  np.testing.assert_array_equal(rotated.model_input, reference.model_input)
  np.testing.assert_array_equal(rotated.display, reference.display)
  assert rotated.display.shape[:2] == (stored.width, stored.height)  # Portrait after rotation.
  assert not np.array_equal(rotated.model_input, stripped.model_input)


def test_pixel_limit_option_refuses_large_images(profile_predictor, photos, tmp_path):
  width, height = tiny_runs.IMAGE_SIZE
  result = predict.predict(
    profile_predictor,
    [str(photos / "photo.png"), str(photos / "photo.bmp"), str(photos / "*.jpg")],
    tmp_path,
    max_pixels=width * height - 1,
    heatmap_panels=False,
    progress=False,
  )
  records = _by_name(result)
  assert "no such file" in records["photo.png"]["error"]
  assert "too_large" in records["photo.bmp"]["error"]
  # JPEGs over the limit are decoded at a reduced scale (as the dataset builder does), not refused.
  assert records["photo.jpg"]["ok"] and records["photo.jpg"]["conversions"] == [
    "downscaled_too_large"
  ]
  assert not (tmp_path / "heatmaps").exists()


def test_worker_processes_read_photos_as_threads_do(profile_predictor, photos, tmp_path):
  files = [
    str(photos / n) for n in ("photo.jpg", "text.jpg", "rotated.jpg", "bomb.png", "deep.png")
  ]
  threads = predict.predict(
    profile_predictor, files, tmp_path / "threads", heatmap_panels=False, progress=False
  )
  processes = predict.predict(
    profile_predictor,
    files,
    tmp_path / "processes",
    heatmap_panels=False,
    loader_processes=1,
    progress=False,
  )
  assert processes.records == threads.records and processes.num_failed == 2


def test_collect_images_globs_folders_and_missing_names(photos):
  entries = predict.collect_images(
    [
      str(photos / "photo.*"),
      str(photos / "nested"),
      str(photos / "nothing*.png"),
      str(photos / "photo.jpg"),
    ]
  )
  names = [(path.name, error) for path, error in entries]
  assert names == [
    ("photo.bmp", None),
    ("photo.jpg", None),
    ("photo.tiff", None),
    ("photo.webp", None),
    ("inner.jpg", None),
    ("nothing*.png", "no file matches this pattern"),
  ]


def test_unique_names_for_panels():
  paths = [pathlib.Path(p) for p in ("a/x.jpg", "b/x.png", "y.gif", "c/x.bmp")]
  assert predict.unique_names(paths) == ["x", "x-2", "y", "x-3"]


def test_command_line_exit_status_and_files(runs, photos, tmp_path):
  out = tmp_path / "cli"
  command = [
    sys.executable,
    "run.py",
    "--mode=predict",
    f"--workdir={runs['profiles']}",
    f"--output={out}",
    "--images",
    str(photos / "photo.jpg"),
    str(photos / "empty.jpg"),
    "--profile=3",
  ]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "1 images failed" in result.stderr and "1 of 2 images scored" in result.stdout
  records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert [r["ok"] for r in records] == [True, False]
  assert records[0]["user_score"] == pytest.approx(records[0]["profile_scores"][3])
  assert (
    out / "heatmaps" / "photo_att.png"
  ).is_file()  # (Exit status 0: test_export's artifact run.)


# ----------------------------------------------------------------------------
# Whose score: profiles and a user's own preferences.


def test_profile_of_a_per_profile_model_is_its_column(profile_predictor, photos, tmp_path):
  result = predict.predict(
    profile_predictor,
    [str(photos / "photo.jpg"), str(photos / "gray.png")],
    tmp_path,
    profile=11,
    progress=False,
  )
  images = np.stack(
    [
      predict.load_image(photos / n, image_size=32, max_side=256, max_pixels=None).model_input
      for n in ("photo.jpg", "gray.png")
    ]
  )
  outputs = profile_predictor(images)
  for i, record in enumerate(result.records):
    assert record["user"] == "profile 11"
    assert record["user_score"] == pytest.approx(float(outputs["score"][i, 11]), rel=1e-6)
    assert record["user_score"] == pytest.approx(record["profile_scores"][11])
    np.testing.assert_allclose(
      record["user_step_scores"], outputs["step_scores"][i, :, 11], rtol=1e-6
    )
  with pytest.raises(predictor_lib.PredictError, match="attribute model"):
    user_scores.resolve_user(profile_predictor.info, preferences_file=str(tmp_path / "ratings.tsv"))
  with pytest.raises(predictor_lib.PredictError, match=r"0\.\.29"):
    user_scores.resolve_user(profile_predictor.info, profile=30)


def _write_ratings(path, ratings: dict, header: bool = False):
  descriptions = {a.attribute_id: a.description for a in attributes.load_attributes()}
  lines = ["attribute_id\tattribute_name\tmy_rating"] if header else []
  lines += [f"{a}\t{descriptions.get(a, a)}\t{r}" for a, r in ratings.items()]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _all_probabilities(record):
  return {a["id"]: a["probability"] for a in record["top_attributes"]}


def test_attribute_model_scores_a_profile_through_its_attributes(
  attribute_predictor, photos, tmp_path
):
  result = predict.predict(
    attribute_predictor,
    [str(photos / "photo.jpg"), str(photos / "deep.png")],
    tmp_path,
    profile=5,
    top_attributes=attributes.NUM_ATTRIBUTES,
    progress=False,
  )
  table = attributes.preference_table("profile", profile_index=5)[:, 0]
  for record in result.records:
    probabilities = _all_probabilities(record)
    assert len(probabilities) == attributes.NUM_ATTRIBUTES  # AP-PR scores a0_safe too.
    # Max pooling, the expected score: each attribute, most sensitive first, scores its
    # preference when it is present and none before it is.
    expected, none_before = 0.0, 1.0
    for a in sorted(probabilities, key=lambda a: -table[attributes.ATTRIBUTE_INDEX[a]]):
      expected += table[attributes.ATTRIBUTE_INDEX[a]] * probabilities[a] * none_before
      none_before *= 1 - probabilities[a]
    assert record["user_score"] == pytest.approx(expected, rel=1e-5)
    assert "heatmap" not in record  # AP-PR has no attention.
  assert not (tmp_path / "heatmaps").exists()


def test_raising_a_preference_raises_the_score_of_images_carrying_the_attribute(
  attribute_predictor, photos, tmp_path
):
  files = [
    str(photos / n) for n in ("photo.jpg", "gray.png", "deep.png", "photo.webp", "rotated.jpg")
  ]
  passport, face = "a31_passport", "a9_face_complete"

  def user_scores(ratings, name, header=False):
    path = _write_ratings(tmp_path / f"{name}.tsv", ratings, header=header)
    result = predict.predict(
      attribute_predictor,
      files,
      tmp_path / name,
      preferences_file=path,
      top_attributes=attributes.NUM_ATTRIBUTES,
      progress=False,
    )
    return result.records

  low = user_scores({passport: 2}, "low")
  high = user_scores({passport: 5}, "high", header=True)
  carrying = np.array(
    [_all_probabilities(r)[passport] for r in low]
  )  # How much each image carries it.
  low_scores, high_scores = (np.array([r["user_score"] for r in rs]) for rs in (low, high))
  # Only the passport is rated (the rest get score.missing_value, 0): the score is 2 or 5 times its probability.
  np.testing.assert_allclose(low_scores, 2 * carrying, rtol=1e-5)
  np.testing.assert_allclose(high_scores, 5 * carrying, rtol=1e-5)
  gain = high_scores - low_scores
  assert np.all(gain > 0)
  assert np.array_equal(
    np.argsort(gain), np.argsort(carrying)
  )  # The more an image carries it, the more it gains.
  # Two rated attributes pool by max, as the checkpoint's score.pooling says: the expected max
  # is 5 when the passport is present, else 3 when the face is.
  both = user_scores({passport: 5, face: 3}, "both")
  for record in both:
    p = _all_probabilities(record)
    expected = 5 * p[passport] + 3 * p[face] * (1 - p[passport])
    assert record["user_score"] == pytest.approx(expected, rel=1e-5)
  assert all(r["user"].startswith("preferences ") for r in both)


# ----------------------------------------------------------------------------
# The checkpoint's config.


def test_a_config_that_describes_another_model_is_refused(runs, tiny_data_dir):
  config = make_tiny_config(
    tiny_data_dir, "privattnet"
  )  # Without per_profile and the wider regressor.
  with pytest.raises(
    predictor_lib.PredictError,
    match="score.per_profile.*regressor_hidden|regressor_hidden.*per_profile",
  ):
    serving.load_checkpoint_predictor(runs["profiles"], config=config)
  config.score.per_profile = True
  config.model.attention.regressor_hidden = 32
  config.input.batch_size = 4  # Not a model field: ignored.
  config.data.data_dir = "/nonexistent"
  config.model.encoder.pretrained = (
    "/elsewhere/resnet50.pth"  # Where training started: not compared.
  )
  predictor_lib.check_config(config, predictor_lib.normalised(_checkpoint_config(runs["profiles"])))  # pylint: disable=protected-access


def _checkpoint_config(workdir):
  from privattnet_jax.training import checkpoints  # pylint: disable=g-import-not-at-top

  manager = checkpoints.create_manager(workdir, keep=1, read_only=True)
  return checkpoints.restore_metadata(manager, manager.best_step())["config"]


def test_predict_does_not_touch_the_dataset(runs, tmp_path, photos, monkeypatch):
  from privattnet_jax import data  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError("predict built or read the dataset")

  monkeypatch.setattr(data, "load_data_sources", refuse)
  monkeypatch.setattr(data, "prepare_builder", refuse)
  predictor = serving.load_checkpoint_predictor(runs["attributes"], batch_size=2)
  assert predictor.info["model"] == "ap_pr" and predictor.info["attribute_ids"] == list(
    attributes.ATTRIBUTE_IDS
  )
  result = predict.predict(predictor, [str(photos / "photo.jpg")], tmp_path, progress=False)
  assert result.num_failed == 0


def test_missing_checkpoint_and_step(tmp_path, runs):
  with pytest.raises(FileNotFoundError, match="train first"):
    serving.load_checkpoint_predictor(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
    serving.load_checkpoint_predictor(runs["profiles"], step=7)


# ----------------------------------------------------------------------------
# The evaluation report and the comparison of runs.


def test_evaluate_writes_the_report_with_localisation(runs):
  workdir = runs["profiles"]
  summary = json.loads((workdir / "eval_test.json").read_text())
  assert summary["model"] == "privattnet"
  localisation = summary["localisation"]
  assert len(localisation["mass_inside"]) == STEPS and len(localisation["pointing_game"]) == STEPS
  assert localisation["num_images"] > 0 and 0 < localisation["box_area"] < 1
  text = (workdir / "report.md").read_text()
  assert "| method | L1 | Pearson | Spearman | MSE | n | source |" in text
  assert f"| privattnet | {summary['l1']:.3f} | {summary['pearson']:.3f} |" in text
  assert "| PrivAttNet | 0.40 | 0.87 | 0.84 |" in text  # The published row beside it.
  assert "## Attention localisation" in text and "## Errors by attribute group" in text
  assert "### Most risky images" in text and "### Least risky images" in text
  examples = sorted((workdir / "report_files").glob("example_*.png"))
  assert len(examples) == 2 * evaluation_report.REPORT_EXAMPLES
  panel = Image.open(examples[0])
  assert panel.width % (STEPS + 1) == 0  # Image + one overlay per step.
  # Training's final evaluation leaves the redaction quality out (--redaction_quality opts in).
  assert "redaction" not in summary and "## Redaction" not in text
  assert not list((workdir / "report_files").glob("redaction_*.png"))
  html_text = (workdir / "report.html").read_text()
  assert html_text.count("data:image/png;base64,") == 1 + 2 * evaluation_report.REPORT_EXAMPLES
  assert "<td>privattnet</td>" in html_text


def test_evaluate_measures_the_redaction_quality_only_when_asked(runs):

  workdir = runs["profiles"]
  config = ml_collections.ConfigDict(_checkpoint_config(workdir))
  plain = evaluator.evaluate_checkpoint(config, str(workdir), "validation")
  assert "localisation" in plain and "redaction" not in plain
  summary = evaluator.evaluate_checkpoint(
    config, str(workdir), "validation", redaction_quality=True
  )
  assert {k: v for k, v in summary.items() if k != "redaction"} == plain
  assert json.loads((workdir / "eval_validation.json").read_text()) == summary
  redaction = summary["redaction"]  # Boxes and attention: redaction quality against random regions.
  assert (
    0 < redaction["num_images"] <= evaluation_report.REDACTION_IMAGES
    and 0 <= redaction["box_coverage"] <= 1
  )
  assert set(redaction["mean_drop"]) == {"attention", "random", "centred"}
  report_dir = workdir / "report_validation"
  text = (report_dir / "report.md").read_text()
  assert "## Redaction" in text and "| random, same area |" in text
  panels = min(evaluation_report.REPORT_EXAMPLES, redaction["num_images"])
  assert len(list((report_dir / "report_files").glob("redaction_*.png"))) == panels
  html_text = (report_dir / "report.html").read_text()
  assert (
    html_text.count("data:image/png;base64,") == 1 + 2 * evaluation_report.REPORT_EXAMPLES + panels
  )


def test_models_without_attention_report_without_localisation(runs):
  workdir = runs["attributes"]
  summary = json.loads((workdir / "eval_test.json").read_text())
  assert "localisation" not in summary and "redaction" not in summary and "attribute_map" in summary
  text = (workdir / "report.md").read_text()
  assert "| ap_pr |" in text and "Attention localisation" not in text and "attribute_map" in text
  assert (
    len(list((workdir / "report_files").glob("example_*.png")))
    == 2 * evaluation_report.REPORT_EXAMPLES
  )


def test_compare_puts_the_runs_beside_the_published_numbers(runs, tmp_path):
  out = evaluation_report.compare_runs(
    [str(runs["profiles"]), str(runs["attributes"])], tmp_path / "compare.md"
  )
  lines = out.read_text().splitlines()
  first = json.loads((runs["profiles"] / "eval_test.json").read_text())
  assert f"| privattnet (privattnet) | {first['l1']:.3f} |" in "\n".join(lines)
  rows = [line for line in lines if line.startswith("| ")]
  assert [row.split(" | ")[0] for row in rows[1:3]] == [
    "| privattnet (privattnet)",
    "| ap_pr (ap_pr)",
  ]
  assert sum("published, VISPR test" in row for row in rows) == 5
  assert "- ap_pr (ap_pr): attribute_map" in out.read_text()
  with pytest.raises(FileNotFoundError, match="eval_test.json does not exist"):
    evaluation_report.compare_runs([str(tmp_path)], tmp_path / "x.md")
