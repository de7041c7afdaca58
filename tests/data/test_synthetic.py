"""The synthetic VISPR-format generator: layout, determinism, caching, and learnable evidence."""

import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from privattnet_jax.data import attributes
from privattnet_jax.data import synthetic
from privattnet_jax.data import synthetic_images

SIZE = 48
COUNTS = {"train2017": 24, "val2017": 6, "test2017": 6}


def _generate(out, seed=0, **kwargs):
  return synthetic.generate(
    out, COUNTS["train2017"], COUNTS["val2017"], COUNTS["test2017"], seed, SIZE, **kwargs
  )


@pytest.fixture(scope="session")
def root(tmp_path_factory):
  return _generate(tmp_path_factory.mktemp("synthetic") / "vispr")


def _annotations(root, split):
  paths = (root / f"{split}.txt").read_text().splitlines()
  return [json.loads((root / p).read_text()) for p in paths]


def test_real_layout(root):
  bundled_line = re.compile(r"^annotations/(train2017|val2017|test2017)/2017_\d+\.json$")
  for line in (attributes.SPLITS_DIR / "train2017.txt").read_text().splitlines()[:5]:
    assert bundled_line.match(line)  # The format the synthetic lists must share.
  for split, count in COUNTS.items():
    lines = (root / f"{split}.txt").read_text().splitlines()
    assert len(lines) == count == len(set(lines))
    for line in lines:
      assert bundled_line.match(line) and line.startswith(f"annotations/{split}/"), line
      annotation = json.loads((root / line).read_text())
      assert annotation["id"] == pathlib.PurePosixPath(line).stem
      assert annotation["image_path"] == f"images/{split}/{annotation['id']}.jpg"
      with Image.open(root / annotation["image_path"]) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
  bundled = sorted(p.name for p in attributes.USER_STUDIES_DIR.glob("*.tsv"))
  assert sorted(p.name for p in (root / "user_studies").glob("*.tsv")) == bundled
  for name in bundled:
    assert (root / "user_studies" / name).read_bytes() == (
      attributes.USER_STUDIES_DIR / name
    ).read_bytes()
  # Ids never collide with real VISPR ids nor across splits.
  ids = [a["id"] for split in COUNTS for a in _annotations(root, split)]
  assert len(ids) == len(set(ids)) and all(i.startswith("2017_9") for i in ids)


def test_labels_match_boxes(root):
  for split in COUNTS:
    for annotation in _annotations(root, split):
      boxes, box_labels, labels = (
        annotation["boxes"],
        annotation["box_labels"],
        annotation["labels"],
      )
      assert len(boxes) == len(box_labels) <= 3
      assert len(set(box_labels)) == len(box_labels)  # Different attributes per image.
      if box_labels:
        assert labels == sorted(box_labels, key=attributes.ATTRIBUTE_INDEX.__getitem__)
        assert set(labels) <= set(synthetic_images.DEFAULT_ATTRIBUTES)
      else:
        assert labels == [attributes.SAFE_ATTRIBUTE]
      for ymin, xmin, ymax, xmax in boxes:
        assert 0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1
      attributes.multi_hot(labels)  # Raises on an unknown id.


def test_statistics_safe_fraction_counts_and_sizes():
  params = synthetic._params(0, 0, 0, 7, 64, synthetic_images.DEFAULT_ATTRIBUTES, 0.25, 0.04, 0.16)
  safe, counts, areas = 0, [], []
  for i in range(300):
    rng = np.random.default_rng([params["seed"], 0, i])
    _, labels, boxes, box_labels = synthetic_images.render_image(rng, 64, params["attributes"])
    safe += labels == ["a0_safe"]
    counts.append(len(box_labels))
    areas += [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
  assert 0.15 < safe / 300 < 0.35
  assert set(counts) == {0, 1, 2, 3}
  areas = np.asarray(areas)
  assert areas.min() >= 0.03 and areas.max() <= 0.2  # 4%..16% up to pixel rounding.
  assert 0.05 < np.mean(areas < 0.05) < 0.35  # Some objects are small.


def test_attribute_set_spans_the_sensitivity_range():
  table = attributes.preference_table()[:, 0]
  for attribute_id in synthetic_images.LOOKS:
    assert attribute_id in attributes.ATTRIBUTE_INDEX
  values = sorted(
    float(table[attributes.ATTRIBUTE_INDEX[a]]) for a in synthetic_images.DEFAULT_ATTRIBUTES
  )
  assert 8 <= len(values) <= 12
  assert values[0] < 2.3 and values[-1] > 3.9  # Low to high risk.
  assert np.max(np.diff(values)) < 0.5  # No large hole in between.


def test_deterministic_by_seed(tmp_path, root):
  again = _generate(tmp_path / "again")
  other = _generate(tmp_path / "other", seed=1)
  files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
  for f in files:
    assert (root / f).read_bytes() == (again / f).read_bytes(), f
  image = "images/train2017/2017_90000000.jpg"
  assert (root / image).read_bytes() != (other / image).read_bytes()
  # Image i depends on (seed, split, i) only: a larger generation extends a smaller one.
  bigger = synthetic.generate(tmp_path / "bigger", 30, 0, 0, 0, SIZE)
  assert (bigger / image).read_bytes() == (root / image).read_bytes()


def test_worker_processes_write_the_same_files(tmp_path, root, monkeypatch):
  monkeypatch.setattr(synthetic, "_PARALLEL_MIN_IMAGES", 0)  # Use the pool for this small set.
  monkeypatch.setattr(
    synthetic, "_CHUNK", 5
  )  # Several chunks per split, one split ending mid-chunk.
  pooled = _generate(tmp_path / "pooled", workers=2)
  files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(pooled) for p in pooled.rglob("*") if p.is_file())
  for f in files:
    assert (root / f).read_bytes() == (pooled / f).read_bytes(), f


def _crop_features(root, split):
  features, targets = [], []
  for annotation in _annotations(root, split):
    with Image.open(root / annotation["image_path"]) as image:
      size = image.size[0]
      for (ymin, xmin, ymax, xmax), label in zip(annotation["boxes"], annotation["box_labels"]):
        crop = image.crop(
          (round(xmin * size), round(ymin * size), round(xmax * size), round(ymax * size))
        )
        features.append(
          np.asarray(crop.resize((12, 12), Image.Resampling.BILINEAR), np.float32).ravel() / 255
        )
        targets.append(label)
  return np.asarray(features), np.asarray(targets)


def test_looks_are_distinct_and_localised(tmp_path):
  # A nearest-centroid classifier on the boxed pixels alone (12x12, after noise and JPEG)
  # must tell the attributes apart: the evidence is in the boxes and each look is its own.
  root = synthetic.generate(tmp_path / "looks", 160, 60, 0, 3, 64)
  train_x, train_y = _crop_features(root, "train2017")
  test_x, test_y = _crop_features(root, "val2017")
  classes = sorted(set(train_y))
  assert classes == sorted(synthetic_images.DEFAULT_ATTRIBUTES)
  centroids = np.stack([train_x[train_y == c].mean(0) for c in classes])
  predicted = np.asarray(classes)[
    np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  ]
  assert np.mean(predicted == test_y) >= 0.9
  # Outside the boxes, a safe image's pixels look like no attribute: random crops of safe
  # images sit farther from every centroid than true objects do from their own.
  rng = np.random.default_rng(0)
  safe_crops = []
  for annotation in _annotations(root, "val2017"):
    if annotation["labels"] == ["a0_safe"]:
      with Image.open(root / annotation["image_path"]) as image:
        for _ in range(4):
          s = int(rng.integers(14, 30))
          x, y = rng.integers(0, 64 - s, 2)
          crop = image.crop((int(x), int(y), int(x) + s, int(y) + s)).resize(
            (12, 12), Image.Resampling.BILINEAR
          )
          safe_crops.append(np.asarray(crop, np.float32).ravel() / 255)
  own = np.median(((test_x - centroids[[classes.index(y) for y in test_y]]) ** 2).sum(-1))
  safe = np.median(((np.asarray(safe_crops)[:, None] - centroids[None]) ** 2).sum(-1).min(1))
  assert safe > 2 * own


def test_ensure_synthetic_reuses_and_regenerates(tmp_path):
  out = tmp_path / "syn"
  params = dict(num_train=3, num_val=1, num_test=1, seed=0, image_size=32)
  assert synthetic.ensure_synthetic(out, **params) == out
  assert synthetic.read_params(out)["num_train"] == 3
  sentinel = out / "sentinel"
  sentinel.write_text("still here")
  synthetic.ensure_synthetic(out, **params)  # Same parameters: reused as is.
  assert sentinel.exists()
  synthetic.ensure_synthetic(out, **{**params, "num_train": 2})  # Different: regenerated cleanly.
  assert not sentinel.exists()
  assert len((out / "train2017.txt").read_text().splitlines()) == 2
  assert len(list((out / "images" / "train2017").iterdir())) == 2
  assert not list(tmp_path.glob(".syn.tmp-*"))


def test_ensure_synthetic_leaves_foreign_folders_alone(tmp_path):
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "precious.txt").write_text("x")
  with pytest.raises(ValueError, match="not a synthetic dataset"):
    synthetic.ensure_synthetic(foreign, num_train=1, num_val=1, num_test=1, seed=0, image_size=32)
  assert (foreign / "precious.txt").read_text() == "x"


def test_invalid_parameters(tmp_path):
  with pytest.raises(ValueError, match="no synthetic look"):
    synthetic.generate(tmp_path, 1, 1, 1, 0, 32, attributes=["a13_full_nudity"])
  with pytest.raises(ValueError, match="safe_fraction"):
    synthetic.generate(tmp_path, 1, 1, 1, 0, 32, safe_fraction=1.5)


def test_command_line(tmp_path, capsys):
  synthetic.main(
    [
      "--out",
      str(tmp_path / "cli"),
      "--num_train",
      "2",
      "--num_val",
      "1",
      "--num_test",
      "1",
      "--seed",
      "5",
      "--image_size",
      "32",
      "--attributes",
      "a9_face_complete,a30_credit_card",
    ]
  )
  assert "Wrote 2 / 1 / 1" in capsys.readouterr().out
  params = synthetic.read_params(tmp_path / "cli")
  assert params["attributes"] == ["a9_face_complete", "a30_credit_card"] and params["seed"] == 5
  assert len((tmp_path / "cli" / "val2017.txt").read_text().splitlines()) == 1
  # A generation made on the command line is reused by ensure_synthetic with the same parameters.
  (tmp_path / "cli" / "sentinel").write_text("")
  synthetic.ensure_synthetic(
    tmp_path / "cli",
    num_train=2,
    num_val=1,
    num_test=1,
    seed=5,
    image_size=32,
    attributes=["a9_face_complete", "a30_credit_card"],
  )
  assert (tmp_path / "cli" / "sentinel").exists()
