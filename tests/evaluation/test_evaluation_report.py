"""evaluation_report: the report's folder and images, and the comparison table of several runs."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from privattnet_jax.evaluation import evaluation_report


def test_report_dir_keeps_splits_apart(tmp_path):
  assert evaluation_report.report_dir(tmp_path, "test") == tmp_path
  assert evaluation_report.report_dir(tmp_path, "validation") == tmp_path / "report_validation"


def test_stored_image_checks_the_id():
  source = [{"image_id": b"2017_1", "image": b"x"}]
  assert evaluation_report._stored_image(source, 0, "2017_1") == b"x"  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="holds '2017_1'"):
    evaluation_report._stored_image(source, 0, "2017_2")  # pylint: disable=protected-access


def _write_eval(workdir, split: str, metrics: dict) -> str:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / f"eval_{split}.json").write_text(json.dumps(metrics))
  return str(workdir)


def test_compare_runs_writes_one_row_per_run_in_order_beside_the_published_rows(tmp_path):
  common = {"mse": 0.5, "pearson": 0.75, "spearman": 0.7, "n": 12, "step": 40, "split": "x"}
  first = _write_eval(tmp_path / "a", "validation", dict(common, model="privattnet", l1=0.25))
  second = _write_eval(tmp_path / "b", "validation", dict(common, l1=0.5, attribute_map=0.125))
  out = evaluation_report.compare_runs(
    [second, first], tmp_path / "out" / "compare.md", "validation"
  )
  text = out.read_text()
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows[1].startswith("| b | 0.500 | 0.750 | 0.700 | 0.500 | 12 |")
  assert rows[2].startswith("| privattnet (a) | 0.250 | 0.750 | 0.700 | 0.500 | 12 |")
  assert sum("published, VISPR test" in row for row in rows) == 5
  assert "- b: attribute_map 0.125" in text
  assert "step 40" not in text and "- privattnet (a):" not in text  # `step` is not a metric.
  with pytest.raises(FileNotFoundError, match=r"run --mode=evaluate --split=test on .*a first"):
    evaluation_report.compare_runs([first], tmp_path / "x.md")  # Only validation was evaluated.
  with pytest.raises(ValueError, match="names no run"):
    evaluation_report.compare_runs([], tmp_path / "x.md")


def test_single_column_averages_the_profiles():
  np.testing.assert_array_equal(evaluation_report.single_column([1.0, 2.0]), [1.0, 2.0])
  np.testing.assert_array_equal(evaluation_report.single_column([[1.0], [2.0]]), [1.0, 2.0])
  np.testing.assert_array_equal(
    evaluation_report.single_column([[1.0, 3.0], [2.0, 6.0]]), [2.0, 4.0]
  )


def test_localisation_summary_needs_attention_and_an_image_with_boxes():
  attention = np.zeros((2, 1, 4), np.float32)
  attention[:, 0, 0] = 1.0  # All mass on the top-left cell of a 2 x 2 grid.
  boxes = np.zeros((2, 1, 4), np.float32)
  boxes[0, 0] = [0.0, 0.0, 0.5, 0.5]  # (y0, x0, y1, x1): the top-left quarter.
  with_boxes = {"attention": attention, "boxes": boxes, "num_boxes": np.array([1, 0])}
  summary = evaluation_report.localisation_summary(with_boxes)
  assert summary["num_images"] == 1 and summary["num_without_boxes"] == 1
  assert summary["mass_inside"] == pytest.approx([1.0])
  assert evaluation_report.localisation_summary(dict(with_boxes, num_boxes=np.zeros(2))) is None
  assert evaluation_report.localisation_summary({"num_boxes": np.ones(2)}) is None


def _jpeg(colour) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (40, 30), colour).save(buffer, format="JPEG")
  return buffer.getvalue()


def test_eval_report_ranks_a_per_profile_runs_mean_score_and_shows_the_stored_images(tmp_path):
  count = 6
  source = [
    {"image_id": f"2017_{i}".encode(), "image": _jpeg((40 * i, 20, 20))} for i in range(count)
  ]
  predictions = np.stack([np.arange(count, dtype=float), np.arange(count, dtype=float) + 1], 1)
  labels = np.zeros((count, 68), bool)
  labels[:, 5] = True
  summary = {"l1": 0.5, "mse": 0.25, "pearson": 1.0, "spearman": 1.0, "n": count, "step": 7}
  markdown, html = evaluation_report.write_eval_report(
    tmp_path,
    method_name="privattnet",
    split="test",
    summary=summary,
    extras={"image_id": np.array([f"2017_{i}" for i in range(count)]), "labels": labels},
    predictions=predictions,
    targets=predictions + 0.5,
    source=source,
    examples=2,
  )
  text = markdown.read_text()
  assert "| privattnet | 0.500 | 1.000 | 1.000 | 0.250 | 6 | measured here, test |" in text
  order = [line.split(":")[0] for line in text.splitlines() if line.startswith("#### ")]
  assert order == ["#### 1. 2017_5", "#### 2. 2017_4", "#### 1. 2017_0", "#### 2. 2017_1"]
  assert "#### 1. 2017_5: predicted 5.50, true 6.00" in text  # The mean of the two profiles.
  panel = Image.open(tmp_path / "report_files" / "example_000_2017_5.png")
  assert panel.size == (40, 30)  # No attention: the stored image itself.
  assert html.is_file()
  source[5] = dict(source[5], image_id=b"2017_99")
  with pytest.raises(ValueError, match="holds '2017_99'"):
    evaluation_report.write_eval_report(
      tmp_path / "again",
      method_name="privattnet",
      split="test",
      summary=summary,
      extras={"image_id": np.array([f"2017_{i}" for i in range(count)]), "labels": labels},
      predictions=predictions,
      targets=predictions,
      source=source,
      examples=2,
    )
