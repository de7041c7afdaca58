"""The evaluation report and the comparison table: contents, embedded images, hand-checked numbers."""

import base64
import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from privattnet_jax.evaluation import report
from privattnet_jax.data import attributes

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))

METRICS = {"l1": 0.5123, "mse": 0.4, "pearson": 0.81, "spearman": 0.79, "n": 4}
PUBLISHED_LINES = [
  "| AP-PR (Orekondy 2017) | 0.656 | – | – | – | – | published, VISPR test |",
  "| PR-CNN (Orekondy 2017) | 0.637 | – | – | – | – | published, VISPR test |",
  "| PrivAttNet | 0.40 | 0.87 | 0.84 | – | – | published, VISPR test |",
  "| PrivAttNet_MLC | 0.44 | 0.83 | 0.76 | – | – | published, VISPR test |",
  "| PrivNet | 0.43 | 0.83 | 0.78 | – | – | published, VISPR test |",
]


def labels_with(*attribute_ids_per_image):
  return np.stack([attributes.multi_hot(ids) for ids in attribute_ids_per_image])


def group_attribute(group):
  return next(a.attribute_id for a in attributes.load_attributes() if a.group == group)


def embedded_pngs(html_text):
  return [
    Image.open(io.BytesIO(base64.b64decode(data)))
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
  ]


class TestCompare:
  def test_runs_in_order_then_published_rows(self):
    table = report.compare_table(
      [
        ("privattnet", METRICS),
        ("privnet", {"l1": 0.7, "mse": 0.9, "pearson": float("nan"), "spearman": 0.5, "n": 10}),
      ]
    )
    lines = table.splitlines()
    assert lines[0] == "| method | L1 | Pearson | Spearman | MSE | n | source |"
    assert lines[2] == "| privattnet | 0.512 | 0.810 | 0.790 | 0.400 | 4 | measured here |"
    assert lines[3] == "| privnet | 0.700 | nan | 0.500 | 0.900 | 10 | measured here |"
    assert lines[4:] == PUBLISHED_LINES

  def test_missing_metrics_show_a_dash(self):
    assert report.compare_table([("partial", {"l1": 1.0})]).splitlines()[2] == (
      "| partial | 1.000 | – | – | – | – | measured here |"
    )

  def test_write_comparison(self, tmp_path):
    path = report.write_comparison(
      tmp_path / "sub" / "compare.md", [("a", METRICS), ("b", {**METRICS, "l1": 0.3, "map": 0.42})]
    )
    text = path.read_text()
    assert "| a | 0.512 |" in text and "| b | 0.300 |" in text
    assert all(line in text for line in PUBLISHED_LINES)
    assert "not rerun here" in text
    assert "- b: map 0.420" in text


class TestErrorsByGroup:
  def test_by_hand(self):
    documents, health = group_attribute("Documents"), group_attribute("Health")
    labels = labels_with([documents], [documents, health], ["a0_safe"], [health])
    predictions = np.array([3.0, 2.0, 0.5, 4.0])
    targets = np.array([4.0, 4.0, 0.0, 3.5])
    rows = {r["group"]: r for r in report.errors_by_group(predictions, targets, labels)}
    assert list(rows) == list(dict.fromkeys(a.group for a in attributes.load_attributes()))
    assert rows["Documents"]["n"] == 2 and rows["Documents"]["mae"] == pytest.approx(1.5)
    assert rows["Documents"]["mean_target"] == pytest.approx(4.0)
    assert rows["Documents"]["mean_prediction"] == pytest.approx(2.5)
    assert rows["Health"]["n"] == 2 and rows["Health"]["mae"] == pytest.approx((2.0 + 0.5) / 2)
    assert rows["Safe"]["n"] == 1 and rows["Safe"]["mae"] == pytest.approx(0.5)
    assert rows["Automobile"] == {
      "group": "Automobile",
      "n": 0,
      "mae": None,
      "mean_target": None,
      "mean_prediction": None,
    }

  def test_shape_errors(self):
    with pytest.raises(ValueError, match="labels"):
      report.errors_by_group(np.zeros(2), np.zeros(2), np.zeros((2, 67), bool))
    with pytest.raises(ValueError, match="one score per image"):
      report.errors_by_group(np.zeros((2, 3)), np.zeros(2), np.zeros((2, 68), bool))


class TestSelectExamples:
  def test_most_and_least(self):
    most, least = report.select_examples([0.5, 3.0, 1.0, 4.0, 2.0], 2)
    assert most.tolist() == [3, 1] and least.tolist() == [0, 2]

  def test_no_overlap_when_few(self):
    most, least = report.select_examples([0.5, 3.0, 1.0], 2)
    assert most.tolist() == [1, 2] and least.tolist() == [0]


def pixels_of(image):
  return np.asarray(image).astype(int)


def blue_points(pixels):
  """(rows, columns) of the translucent blue points: blue well above red (not grey, not red)."""
  return np.nonzero(pixels[..., 2] > pixels[..., 0] + 40)


def identity_line(pixels):
  """(rows, columns) of the red y = x line."""
  return np.nonzero((pixels[..., 0] > pixels[..., 1] + 80) & (pixels[..., 0] > pixels[..., 2] + 80))


class TestScatter:
  def test_size_and_drawn(self):
    image = report.scatter_plot([3.0, 2.0, 0.5], [4.0, 4.0, 0.0], title="t")
    assert image.size == report.SCATTER_SIZE and image.mode == "RGB"
    pixels = pixels_of(image)
    assert (pixels < 100).all(axis=-1).sum() > 500  # Axes, ticks, labels and title in black.
    assert len(blue_points(pixels)[0]) > 0 and len(identity_line(pixels)[0]) > 0

  def test_point_where_its_scores_are(self):
    """With value_range (0, 5) the y = x line spans the plot's box, which locates each score."""

    def point_centre(predicted, true):
      pixels = pixels_of(report.scatter_plot([predicted], [true], value_range=(0.0, 5.0)))
      rows, columns = identity_line(pixels)
      top, bottom, left, right = rows.min(), rows.max(), columns.min(), columns.max()
      expected = (bottom - predicted / 5 * (bottom - top), left + true / 5 * (right - left))
      point_rows, point_columns = blue_points(pixels)
      return (point_rows.mean(), point_columns.mean()), expected

    for predicted, true in ((4.0, 1.0), (1.0, 4.0), (2.5, 2.0)):
      centre, expected = point_centre(predicted, true)
      np.testing.assert_allclose(centre, expected, atol=3)

  def test_identity_line_corner_to_corner_on_the_datas_shared_range(self):
    # Predictions span far more than the targets: both axes still take the range of both.
    pixels = pixels_of(report.scatter_plot([-3.0, 9.0, 2.0], [1.0, 2.0, 3.0]))
    rows, columns = identity_line(pixels)
    assert abs((rows.max() - rows.min()) - (columns.max() - columns.min())) <= 2  # A square box.
    assert columns[rows.argmax()] <= columns.min() + 2  # Starts bottom left ...
    assert columns[rows.argmin()] >= columns.max() - 2  # ... ends top right.
    point_rows, point_columns = blue_points(pixels)
    # Every point inside the box, none on its edge (the range is padded).
    assert rows.min() < point_rows.min() and point_rows.max() < rows.max()
    assert columns.min() < point_columns.min() and point_columns.max() < columns.max()
    assert point_rows.max() - point_rows.min() > 0.7 * (rows.max() - rows.min())

  def test_non_finite_points_skipped_and_bad_range(self):
    with_nan = pixels_of(report.scatter_plot([1.0, np.nan, 3.0], [1.0, 2.0, np.inf]))
    finite = pixels_of(report.scatter_plot([1.0], [1.0]))
    # Same axes and points; only the title (its count of undrawn points) differs.
    below_title = identity_line(finite)[0].min() - 2
    np.testing.assert_array_equal(with_nan[below_title:], finite[below_title:])
    assert not np.array_equal(with_nan[:below_title], finite[:below_title])
    with pytest.raises(ValueError, match="low < high"):
      report.scatter_plot([1.0], [1.0], value_range=(2.0, 2.0))

  def test_no_matplotlib_until_a_plot_is_drawn_and_no_pyplot(self):
    """Importing the report or the heat maps stays cheap; drawing leaves matplotlib's global
    state (pyplot, its backend) untouched."""
    script = (
      "import sys\n"
      "import numpy as np\n"
      "from privattnet_jax.evaluation import evaluation_report, report\n"
      "from privattnet_jax.inference import heatmaps\n"
      "assert 'matplotlib' not in sys.modules, 'imported with the modules'\n"
      "report.scatter_plot([1.0], [2.0])\n"
      "heatmaps.colourise(np.zeros(4, np.uint8))\n"
      "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, env=ENV)


class TestWriteReport:
  def make(self, tmp_path, localisation=None, examples=None):
    predictions = np.array([3.0, 2.0, 0.5, 4.0])
    targets = np.array([4.0, 4.0, 0.0, 3.5])
    labels = labels_with(
      [group_attribute("Documents")], ["a0_safe"], ["a0_safe"], [group_attribute("Health")]
    )
    if examples is None:
      most, least = report.select_examples(predictions, 1)
      examples = [
        {
          "image_id": b"img<3>",
          "score": predictions[most[0]],
          "target": targets[most[0]],
          "kind": "most",
          "panel": Image.new("RGB", (30, 12), (255, 0, 0)),
        },
        {
          "image_id": "img_low",
          "score": predictions[least[0]],
          "target": None,
          "kind": "least",
          "panel": np.zeros((10, 20, 3), np.uint8),
        },
      ]
    return report.write_report(
      tmp_path,
      method_name="PrivAttNet (ours)",
      metrics=METRICS,
      predictions=predictions,
      targets=targets,
      labels=labels,
      examples=examples,
      localisation=localisation,
    )

  def test_files_table_and_embedded_images(self, tmp_path):
    md_path, html_path = self.make(tmp_path)
    assert md_path == tmp_path / "report.md" and html_path == tmp_path / "report.html"
    markdown, page = md_path.read_text(), html_path.read_text()
    row = "| PrivAttNet (ours) | 0.512 | 0.810 | 0.790 | 0.400 | 4 | measured here, test |"
    assert row in markdown
    assert all(line in markdown for line in PUBLISHED_LINES)
    assert (
      "<td>PrivAttNet (ours)</td><td>0.512</td><td>0.810</td><td>0.790</td><td>0.400</td><td>4</td>"
      in page
    )
    assert page.count("published, VISPR test") >= 5
    # Errors by group: Safe carries images 2 and 3 (|2 - 4| and |0.5 - 0|).
    assert "| Safe | 2 | 1.250 |" in markdown
    # Self-contained: every image is a data URI (scatter + 2 panels), none is a file.
    images = embedded_pngs(page)
    assert [im.size for im in images] == [report.SCATTER_SIZE, (30, 12), (20, 10)]
    assert len(re.findall(r'src="', page)) == 3
    # Markdown points at PNGs written beside it.
    linked = re.findall(r"\]\((report_files/[^)]+\.png)\)", markdown)
    assert len(linked) == 3 and all((tmp_path / p).is_file() for p in linked)
    # Examples: most then least risky, ids escaped in HTML.
    assert markdown.index("Most risky") < markdown.index("img<3>") < markdown.index("Least risky")
    assert "img&lt;3&gt;" in page and "img<3>" not in page
    assert "1. img_low: predicted 0.50, true –" in markdown
    assert "Attention localisation" not in markdown

  def test_localisation_table_when_present(self, tmp_path):
    localisation = {
      "mass_inside": [0.5, 0.625],
      "box_area": 0.25,
      "pointing_game": [0.75, 1.0],
      "pointing_chance": 0.2,
      "num_images": 4,
      "num_without_boxes": 3,
    }
    md_path, html_path = self.make(tmp_path, localisation=localisation, examples=[])
    markdown = md_path.read_text()
    assert "| 1 | 0.500 | 0.250 | 0.750 | 0.200 |" in markdown
    assert "| 2 | 0.625 | 0.250 | 1.000 | 0.200 |" in markdown
    assert "4 images with ground-truth boxes (3 images without boxes excluded)" in markdown
    assert "<td>0.625</td>" in html_path.read_text()
    assert len(embedded_pngs(html_path.read_text())) == 1  # The scatter plot only.

  def test_bad_panel_rejected(self, tmp_path):
    with pytest.raises(ValueError, match="panel"):
      self.make(
        tmp_path,
        examples=[
          {
            "image_id": "x",
            "score": 1.0,
            "target": 1.0,
            "kind": "most",
            "panel": np.zeros((4, 4), np.float32),
          }
        ],
      )
