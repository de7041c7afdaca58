"""The `vispr` TFDS builder: built from the synthetic dataset and from a deliberately messy copy.

Every kind of bad input is planted once, under a descriptive id, and must show up
in the build report under its reason; convertible images must come out as RGB
JPEGs with the right pixels and orientation.
"""

import io
import json
import pathlib
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from privattnet_jax import data
from privattnet_jax.data import attributes
from privattnet_jax.data import synthetic, vispr
from privattnet_jax.inference import preprocessing
from privattnet_jax.data import vispr_layout
from privattnet_jax.data import build_report

SIZE = 48
MAX_PIXELS = 200_000  # Small, so that the too-large paths are tested with small files.


def _jpeg(image, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=95, **kwargs)
  return buffer.getvalue()


def _encoded(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _halves(mode, size, left, right):
  """An image whose left half is `left` and right half `right`."""
  image = Image.new(mode, size, left)
  image.paste(right, (size[0] // 2, 0, size[0], size[1]))
  return image


def _decode(record):
  return np.asarray(Image.open(io.BytesIO(record["image"])))


def _records(source):
  return {record["image_id"].decode(): record for record in (source[i] for i in range(len(source)))}


# ---------------------------------------------------------------------------------------------
# A clean build from the synthetic dataset.


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
  return synthetic.generate(
    tmp_path_factory.mktemp("syn") / "vispr", 10, 4, 4, seed=0, image_size=SIZE
  )


@pytest.fixture(scope="session")
def clean(synthetic_root, tmp_path_factory):
  builder = vispr.prepare(
    synthetic_root, tmp_path_factory.mktemp("tfds_clean"), "max256", splits_dir=synthetic_root
  )
  return builder, vispr.data_sources(builder)


def test_split_sizes_and_features(clean):
  builder, sources = clean
  assert {split: len(source) for split, source in sources.items()} == {
    "train": 10,
    "validation": 4,
    "test": 4,
  }
  assert builder.info.splits["train"].num_examples == 10
  record = sources["train"][0]
  assert set(record) == {"image", "image_id", "labels", "height", "width", "boxes"}
  assert isinstance(record["image"], bytes) and record["image"][:3] == b"\xff\xd8\xff"
  assert isinstance(record["image_id"], bytes)
  assert record["labels"].dtype == np.bool_ and record["labels"].shape == (
    attributes.NUM_ATTRIBUTES,
  )
  assert (
    record["boxes"].dtype == np.float32
    and record["boxes"].ndim == 2
    and record["boxes"].shape[1] == 4
  )
  assert "tensorflow" not in sys.modules  # Built and read without TensorFlow.


def test_records_match_annotations(clean, synthetic_root):
  _, sources = clean
  for split, folder in (("train", "train2017"), ("validation", "val2017"), ("test", "test2017")):
    records = _records(sources[split])
    listed = (synthetic_root / f"{folder}.txt").read_text().splitlines()
    assert sorted(records) == sorted(pathlib.PurePosixPath(p).stem for p in listed)
    for line in listed:
      annotation = json.loads((synthetic_root / line).read_text())
      record = records[annotation["id"]]
      np.testing.assert_array_equal(record["labels"], attributes.multi_hot(annotation["labels"]))
      np.testing.assert_allclose(
        record["boxes"], np.asarray(annotation["boxes"], np.float32).reshape(-1, 4)
      )
      assert (record["height"], record["width"]) == (SIZE, SIZE)
      # Already an RGB JPEG within 256 px: stored byte for byte.
      assert record["image"] == (synthetic_root / annotation["image_path"]).read_bytes()
  assert any(len(r["boxes"]) for r in _records(sources["train"]).values())  # Boxes survive.


def test_clean_report_saved_beside_the_data(clean):
  builder, _ = clean
  report = build_report.load_build_report(builder)
  assert (pathlib.Path(builder.data_path) / build_report.REPORT_FILENAME).is_file()
  assert report["total"] == {
    "listed": 18,
    "written": 18,
    "skipped": 0,
    "skip_reasons": {},
    "conversions": {},
  }
  assert report["unknown_label_policy"] == "skip_example"


def test_deterministic_keys_and_order(clean, synthetic_root, tmp_path):
  _, sources = clean
  again = vispr.data_sources(
    vispr.prepare(synthetic_root, tmp_path, "max256", splits_dir=synthetic_root)
  )
  for split in sources:
    first = [sources[split][i] for i in range(len(sources[split]))]
    second = [again[split][i] for i in range(len(again[split]))]
    assert [r["image_id"] for r in first] == [r["image_id"] for r in second]
    assert [r["image"] for r in first] == [r["image"] for r in second]


def test_reuse_does_not_rebuild(clean, synthetic_root):
  builder, _ = clean
  info = pathlib.Path(builder.data_path) / "dataset_info.json"
  before = info.stat().st_mtime_ns
  again = vispr.prepare(synthetic_root, builder.data_dir_root, "max256", splits_dir=synthetic_root)
  assert again.data_path == builder.data_path and info.stat().st_mtime_ns == before


def test_builder_pickles_with_its_options(clean, synthetic_root):
  builder, _ = clean
  restored = pickle.loads(pickle.dumps(builder))
  assert restored._splits_dir == pathlib.Path(synthetic_root)  # pylint: disable=protected-access
  assert restored._max_pixels == builder._max_pixels  # pylint: disable=protected-access
  assert restored.builder_config.name == "max256"


# ---------------------------------------------------------------------------------------------
# A messy manual dir: every kind of bad input once.

# id -> expected skip reason (train split).
SKIPS = {
  "bad_missing_image": "missing_image",
  "bad_image_is_a_folder": "not_a_regular_file",
  "bad_truncated_jpeg": "corrupt_image",
  "bad_garbled_jpeg": "corrupt_image",
  "bad_corrupt_png": "corrupt_image",
  "bad_text_file": "not_an_image",
  "bad_empty_file": "not_an_image",
  "bad_json_syntax": "malformed_json",
  "bad_json_list": "malformed_json",
  "bad_missing_annotation": "missing_annotation",
  "bad_empty_labels": "empty_labels",
  "bad_unknown_label": "unknown_label",
  "bad_labels_type": "malformed_annotation",
  "bad_boxes": "malformed_annotation",
  "bad_huge_png": "too_large",
  "2017_90000000": "duplicate_id",  # A second annotation claiming the first synthetic image's id.
}
# id -> expected conversions (train split); these are written.
CONVERTED = {
  "conv_gray": ["grayscale"],
  "conv_bilevel": ["grayscale"],
  "conv_cmyk": ["cmyk"],
  "conv_palette": ["palette"],
  "conv_palette_transparent": ["palette", "alpha"],
  "conv_rgba": ["alpha"],
  "conv_la": ["alpha"],
  "conv_rgb_transparent_colour": ["alpha"],
  "conv_i16": ["16bit"],
  "conv_i32": ["16bit"],
  "conv_float": ["16bit"],
  "conv_exif": ["exif_rotated"],
  "conv_huge_jpeg": ["downscaled_too_large"],
}
CLEAN_EXTRA = ["ok_png", "ok_wide_jpeg", "ok_big_jpeg"]


def _add(
  root,
  split_folder,
  image_id,
  *,
  image=None,
  annotation=None,
  raw_annotation=None,
  image_name=None,
  list_it=True,
):
  """Writes an annotation (and its image bytes) into root and lists it in the split list."""
  image_path = f"images/{split_folder}/{image_name or image_id + '.jpg'}"
  if image is not None:
    (root / image_path).write_bytes(image)
  relative = f"annotations/{split_folder}/{image_id}.json"
  if raw_annotation is not None:
    (root / relative).write_text(raw_annotation)
  elif annotation is not False:
    content = {"id": image_id, "image_path": image_path, "labels": ["a9_face_complete"]}
    content.update(annotation or {})
    (root / relative).write_text(json.dumps(content))
  if list_it:
    with open(root / f"{split_folder}.txt", "a") as f:
      f.write(relative + "\n")


@pytest.fixture(scope="session")
def messy_root(tmp_path_factory):
  root = synthetic.generate(
    tmp_path_factory.mktemp("messy") / "vispr", 4, 2, 2, seed=1, image_size=SIZE
  )
  tr = "train2017"
  rgb = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
  good_jpeg = _jpeg(rgb)
  noise = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
  noisy_jpeg = _jpeg(Image.fromarray(noise))

  # Skips.
  _add(root, tr, "bad_missing_image")
  (root / "images" / tr / "bad_image_is_a_folder.jpg").mkdir()
  _add(root, tr, "bad_image_is_a_folder")
  _add(root, tr, "bad_truncated_jpeg", image=noisy_jpeg[: len(noisy_jpeg) // 2])
  garbled = noisy_jpeg[:200] + bytes(
    np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8)
  )
  _add(root, tr, "bad_garbled_jpeg", image=garbled)
  png = bytearray(_encoded(Image.fromarray(noise), "PNG"))
  png[len(png) // 2] ^= 0xFF
  _add(root, tr, "bad_corrupt_png", image=bytes(png), image_name="bad_corrupt_png.png")
  _add(root, tr, "bad_text_file", image=b"<html>404 Not Found</html>\n")
  _add(root, tr, "bad_empty_file", image=b"")
  _add(
    root,
    tr,
    "bad_json_syntax",
    image=good_jpeg,
    raw_annotation='{"id": "bad_json_syntax", "labels": [',
  )
  _add(root, tr, "bad_json_list", image=good_jpeg, raw_annotation='["a9_face_complete"]')
  _add(root, tr, "bad_missing_annotation", image=good_jpeg, annotation=False)
  _add(root, tr, "bad_empty_labels", image=good_jpeg, annotation={"labels": []})
  _add(
    root,
    tr,
    "bad_unknown_label",
    image=good_jpeg,
    annotation={"labels": ["a9_face_complete", "a200_alien"]},
  )
  _add(root, tr, "bad_labels_type", image=good_jpeg, annotation={"labels": "a9_face_complete"})
  _add(root, tr, "bad_boxes", image=good_jpeg, annotation={"boxes": [[0.1, 0.2, 0.3]]})
  _add(
    root,
    tr,
    "bad_huge_png",
    image=_encoded(Image.new("RGB", (500, 500), (0, 90, 0)), "PNG"),
    image_name="bad_huge_png.png",
  )
  duplicate = json.loads((root / "annotations" / tr / "2017_90000000.json").read_text())
  (root / "annotations" / tr / "duplicate.json").write_text(json.dumps(duplicate))
  with open(root / f"{tr}.txt", "a") as f:
    f.write(f"annotations/{tr}/duplicate.json\n")

  # Conversions.
  gray = Image.new("L", (SIZE, SIZE), 77)
  _add(root, tr, "conv_gray", image=_jpeg(gray))
  _add(
    root,
    tr,
    "conv_bilevel",
    image=_encoded(_halves("1", (SIZE, SIZE), 0, 1), "PNG"),
    image_name="b.png",
  )
  _add(root, tr, "conv_cmyk", image=_jpeg(Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0))))
  palette = _halves("RGB", (SIZE, SIZE), (0, 160, 0), (0, 0, 200)).convert(
    "P", palette=Image.Palette.ADAPTIVE, colors=4
  )
  _add(root, tr, "conv_palette", image=_encoded(palette, "PNG"), image_name="p.png")
  transparent_index = palette.getpixel((0, 0))
  _add(
    root,
    tr,
    "conv_palette_transparent",
    image=_encoded(palette, "PNG", transparency=transparent_index),
    image_name="pt.png",
  )
  rgba = _halves("RGBA", (SIZE, SIZE), (0, 0, 0, 0), (200, 0, 0, 255))
  _add(root, tr, "conv_rgba", image=_encoded(rgba, "PNG"), image_name="rgba.png")
  keyed = _halves("RGB", (SIZE, SIZE), (0, 0, 0), (200, 0, 0))
  _add(
    root,
    tr,
    "conv_rgb_transparent_colour",
    image=_encoded(keyed, "PNG", transparency=(0, 0, 0)),
    image_name="trns.png",
  )
  la = _halves("LA", (SIZE, SIZE), (0, 0), (60, 255))
  _add(root, tr, "conv_la", image=_encoded(la, "PNG"), image_name="la.png")
  ramp = np.tile(np.linspace(0, 65535, SIZE).round().astype(np.uint16), (SIZE, 1))
  _add(root, tr, "conv_i16", image=_encoded(Image.fromarray(ramp), "PNG"), image_name="i16.png")
  _add(
    root,
    tr,
    "conv_i32",
    image=_encoded(Image.fromarray(ramp.astype(np.int32)), "TIFF"),
    image_name="i32.tif",
  )
  ramp01 = (ramp / 65535).astype(np.float32)
  _add(root, tr, "conv_float", image=_encoded(Image.fromarray(ramp01), "TIFF"), image_name="f.tif")
  exif = Image.Exif()
  exif[0x0112] = 6  # Stored sideways: rotate 90 degrees clockwise to display.
  sideways = _halves("RGB", (64, 32), (255, 0, 0), (0, 0, 255))  # Left red, right blue.
  _add(root, tr, "conv_exif", image=_jpeg(sideways, exif=exif))
  huge = Image.fromarray(np.tile(np.linspace(0, 255, 640).astype(np.uint8), (480, 1))).convert(
    "RGB"
  )
  _add(root, tr, "conv_huge_jpeg", image=_jpeg(huge))  # 307,200 px > MAX_PIXELS: decoded at 1/2.

  # Clean extras: a PNG is re-encoded, large JPEGs are downscaled to shorter side 256.
  _add(root, tr, "ok_png", image=_encoded(rgb, "PNG"), image_name="ok.png")
  _add(root, tr, "ok_wide_jpeg", image=_jpeg(Image.new("RGB", (600, 300), (10, 200, 10))))
  _add(
    root,
    tr,
    "ok_big_jpeg",
    image=_jpeg(Image.new("RGB", (256 * 4 + 40, 256 * 4 + 8), (10, 10, 200))),
    annotation={"labels": ["a30_credit_card"]},
  )

  # The validation split gets its own problem, reported under its own split.
  _add(root, "val2017", "bad_val_missing_image")
  return root


@pytest.fixture(scope="session")
def messy(messy_root, tmp_path_factory):
  builder = vispr.prepare(
    messy_root,
    tmp_path_factory.mktemp("tfds_messy"),
    "max256",
    splits_dir=messy_root,
    max_pixels=MAX_PIXELS,
  )
  return builder, vispr.data_sources(builder), build_report.load_build_report(builder)


def test_report_counts_every_skip_under_its_reason(messy):
  _, sources, report = messy
  train = report["splits"]["train"]
  expected: dict[str, list[str]] = {}
  for image_id, reason in SKIPS.items():
    expected.setdefault(reason, []).append(image_id)
  assert {r: sorted(e["ids"]) for r, e in train["skip_reasons"].items()} == {
    r: sorted(v) for r, v in expected.items()
  }
  for reason, entry in train["skip_reasons"].items():
    assert entry["count"] == len(entry["ids"]) == len(entry["messages"])
  assert "a200_alien" in train["skip_reasons"]["unknown_label"]["messages"][0]
  n_train = 4 + len(SKIPS) + len(CONVERTED) + len(CLEAN_EXTRA)
  assert (train["listed"], train["skipped"], train["written"]) == (
    n_train,
    len(SKIPS),
    n_train - len(SKIPS),
  )
  assert len(sources["train"]) == n_train - len(SKIPS)
  validation = report["splits"]["validation"]
  assert validation["skip_reasons"] == {
    "missing_image": {
      "count": 1,
      "ids": ["bad_val_missing_image"],
      "messages": validation["skip_reasons"]["missing_image"]["messages"],
    }
  }
  assert report["splits"]["test"]["skipped"] == 0
  assert report["total"]["skipped"] == len(SKIPS) + 1
  written = _records(sources["train"])
  assert not set(SKIPS) - {"2017_90000000"} & set(written)
  assert "2017_90000000" in written  # The first holder of a duplicated id is kept.


def test_report_lists_conversions(messy):
  _, _, report = messy
  conversions = report["splits"]["train"]["conversions"]
  by_id: dict[str, list[str]] = {}
  for kind, entry in conversions.items():
    assert entry["count"] == len(entry["ids"])
    for image_id in entry["ids"]:
      by_id.setdefault(image_id, []).append(kind)
  assert {k: sorted(v) for k, v in by_id.items()} == {k: sorted(v) for k, v in CONVERTED.items()}


def test_every_written_image_is_an_rgb_jpeg(messy):
  _, sources, _ = messy
  for split, source in sources.items():
    for image_id, record in _records(source).items():
      assert record["image"][:3] == b"\xff\xd8\xff", (split, image_id)
      with Image.open(io.BytesIO(record["image"])) as image:
        assert image.format == "JPEG" and image.mode == "RGB", (split, image_id)


def test_conversions_keep_the_content(messy):
  _, sources, _ = messy
  records = _records(sources["train"])

  def pixel(image_id, x, y):
    return _decode(records[image_id])[y, x].astype(int)

  def near(value, target, tol=12):
    return np.all(np.abs(np.asarray(value) - np.asarray(target)) <= tol)

  assert near(pixel("conv_gray", 20, 20), (77, 77, 77))
  assert near(pixel("conv_bilevel", 5, 20), (0, 0, 0)) and near(
    pixel("conv_bilevel", 40, 20), (255, 255, 255)
  )
  assert near(pixel("conv_cmyk", 20, 20), (255, 0, 0), tol=20)
  assert near(pixel("conv_palette", 5, 20), (0, 160, 0), 20) and near(
    pixel("conv_palette", 40, 20), (0, 0, 200), 20
  )
  # Transparent pixels are composited on white.
  assert near(pixel("conv_palette_transparent", 5, 20), (255, 255, 255))
  assert near(pixel("conv_palette_transparent", 40, 20), (0, 0, 200), 20)
  assert near(pixel("conv_rgba", 5, 20), (255, 255, 255)) and near(
    pixel("conv_rgba", 40, 20), (200, 0, 0), 20
  )
  assert near(pixel("conv_rgb_transparent_colour", 5, 20), (255, 255, 255))
  assert near(pixel("conv_rgb_transparent_colour", 40, 20), (200, 0, 0), 20)
  assert near(pixel("conv_la", 5, 20), (255, 255, 255)) and near(
    pixel("conv_la", 40, 20), (60, 60, 60)
  )
  # 16-bit ramps scaled to 0..255, not clipped.
  for image_id in ("conv_i16", "conv_i32", "conv_float"):
    row = _decode(records[image_id])[SIZE // 2, :, 0].astype(int)
    assert row[1] < 20 and row[-2] > 235 and abs(row[SIZE // 2] - 128) < 16, (image_id, row)
    assert (records[image_id]["height"], records[image_id]["width"]) == (SIZE, SIZE)


def test_exif_orientation_is_applied(messy):
  _, sources, _ = messy
  record = _records(sources["train"])["conv_exif"]
  image = _decode(record)
  # Stored 64 wide x 32 high, left red / right blue, orientation 6: shown 32 x 64, red on top.
  assert image.shape == (64, 32, 3)
  assert (record["height"], record["width"]) == (64, 32)
  top, bottom = image[10, 16].astype(int), image[54, 16].astype(int)
  assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_resizing_and_oversize(messy):
  _, sources, _ = messy
  records = _records(sources["train"])
  wide = records["ok_wide_jpeg"]
  assert _decode(wide).shape == (256, 512, 3) and (wide["height"], wide["width"]) == (300, 600)
  big = records["ok_big_jpeg"]  # Decoded at 1/4 via draft, then resized to shorter side 256.
  assert _decode(big).shape[0] == 256 and abs(_decode(big).shape[1] - 264) <= 1
  assert (big["height"], big["width"]) == (256 * 4 + 8, 256 * 4 + 40)
  np.testing.assert_array_equal(big["labels"], attributes.multi_hot(["a30_credit_card"]))
  huge = records["conv_huge_jpeg"]  # Over max_pixels: decoded at half size, below 256 so kept.
  assert _decode(huge).shape == (240, 320, 3) and (huge["height"], huge["width"]) == (480, 640)
  png = records["ok_png"]
  assert png["image"][:3] == b"\xff\xd8\xff" and (png["height"], png["width"]) == (SIZE, SIZE)


def test_original_config_keeps_size_and_prints_report(messy_root, tmp_path, capsys):
  builder = vispr.prepare(
    messy_root, tmp_path, "original", splits_dir=messy_root, max_pixels=MAX_PIXELS
  )
  printed = capsys.readouterr().out
  assert "VISPR build report" in printed and "skipped too_large: 1: bad_huge_png" in printed
  assert build_report.REPORT_FILENAME in printed
  records = _records(vispr.data_sources(builder)["train"])
  assert _decode(records["ok_wide_jpeg"]).shape == (300, 600, 3)
  assert _decode(records["ok_big_jpeg"]).shape == (258, 266, 3)  # Over max_pixels: 1/4 scale.
  assert _decode(records["conv_huge_jpeg"]).shape == (240, 320, 3)  # The pixel limit still holds.
  assert _decode(records["conv_exif"]).shape == (64, 32, 3)
  report = build_report.load_build_report(builder)
  assert report["config"] == "original" and report["total"]["skipped"] == len(SKIPS) + 1


def test_strict_build_raises_listing_every_skip(messy_root, tmp_path, capsys):
  with pytest.raises(vispr.StrictBuildError) as error:
    vispr.prepare(
      messy_root, tmp_path, "max256", splits_dir=messy_root, strict=True, max_pixels=MAX_PIXELS
    )
  message = str(error.value)
  for image_id, reason in SKIPS.items():
    assert image_id in message and reason in message
  assert "bad_val_missing_image" in message
  assert "bad_val_missing_image" in capsys.readouterr().out
  assert not list(tmp_path.rglob("dataset_info.json"))  # Nothing half-built is left to reuse.


def test_strict_refuses_a_reused_build_with_skips(messy, messy_root):
  builder, _, _ = messy
  with pytest.raises(vispr.StrictBuildError, match="bad_huge_png"):
    vispr.prepare(
      messy_root,
      builder.data_dir_root,
      "max256",
      splits_dir=messy_root,
      strict=True,
      max_pixels=MAX_PIXELS,
    )


# ---------------------------------------------------------------------------------------------
# Missing or incomplete manual dirs fail at once, with the download instructions.


def _assert_fails_at_once(manual_dir, splits_dir, data_dir, match):
  with pytest.raises(vispr_layout.ManualDirError, match=match) as error:
    vispr.prepare(manual_dir, data_dir, "max256", splits_dir=splits_dir)
  assert vispr_layout.MANUAL_DOWNLOAD_INSTRUCTIONS in str(error.value)
  assert "annotations/train2017/2017_<id>.json" in str(error.value)
  assert not list(pathlib.Path(data_dir).rglob("*.array_record*"))


def test_missing_manual_dir(tmp_path):
  _assert_fails_at_once(tmp_path / "not_there", "", tmp_path / "tfds", "does not exist")


def test_manual_dir_without_annotations(tmp_path):
  (tmp_path / "vispr" / "images" / "train2017").mkdir(parents=True)
  _assert_fails_at_once(tmp_path / "vispr", "", tmp_path / "tfds", "no annotations/ folder")


def test_split_list_pointing_to_nothing(synthetic_root, tmp_path):
  root = tmp_path / "vispr"
  shutil.copytree(synthetic_root, root)
  shutil.rmtree(root / "annotations" / "val2017")  # The val annotations archive was not extracted.
  _assert_fails_at_once(
    root, root, tmp_path / "tfds", r"none of the 4 annotations listed in .*val2017.txt"
  )
  # Without its own lists at the root, the bundled lists name real VISPR ids, which it does not have.
  for name in vispr_layout.SPLIT_FILES.values():
    (root / name).unlink()
  _assert_fails_at_once(
    root,
    "",
    tmp_path / "tfds",
    "none of the 10000 annotations listed .*; for a dataset of "
    "your own, put its train2017.txt, val2017.txt, test2017.txt at .* or set data.splits_dir",
  )


def test_split_lists_at_the_root_need_no_splits_dir(synthetic_root, tmp_path, caplog):
  config = _config(tmp_path)
  config.data.manual_dir = str(synthetic_root)
  with caplog.at_level("INFO"):
    sources = data.load_data_sources(config.data)
  assert {s: len(v) for s, v in sources.items()} == {"train": 10, "validation": 4, "test": 4}
  assert (
    f"Split lists: {synthetic_root / 'train2017.txt'}, {synthetic_root / 'val2017.txt'}"
    in caplog.text
  )
  partial = tmp_path / "partial"
  shutil.copytree(synthetic_root, partial)
  (partial / "val2017.txt").unlink()
  (partial / "test2017.txt").unlink()
  _assert_fails_at_once(
    partial,
    "",
    tmp_path / "tfds_partial",
    "holds the split list train2017.txt but not "
    "val2017.txt, test2017.txt: add them, or set data.splits_dir",
  )


def test_missing_or_empty_split_list(synthetic_root, tmp_path):
  root = tmp_path / "vispr"
  shutil.copytree(synthetic_root, root)
  (root / "test2017.txt").unlink()
  (root / "val2017.txt").write_text("\n")
  with pytest.raises(vispr_layout.ManualDirError) as error:
    vispr.prepare(root, tmp_path / "tfds", splits_dir=root)
  assert "test2017.txt does not exist" in str(error.value) and "val2017.txt is empty" in str(
    error.value
  )


def test_tfds_entry_point_checks_too(tmp_path):
  # Built the tfds way (e.g. the `tfds build` CLI) rather than through prepare().
  builder = vispr.Vispr(data_dir=tmp_path / "tfds")
  with pytest.raises(vispr_layout.ManualDirError, match="does not exist"):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "none"))
    )


# ---------------------------------------------------------------------------------------------
# Image normalisation on its own.


def test_process_image_drafts_large_jpegs():
  image = Image.new("RGB", (2048, 1536), (20, 120, 220))
  encoded, height, width, conversions = preprocessing.process_image(_jpeg(image), max_side=256)
  with Image.open(io.BytesIO(encoded)) as out:
    assert out.size == (341, 256)
    assert np.abs(np.asarray(out)[100, 100].astype(int) - (20, 120, 220)).max() <= 6
  assert (height, width, conversions) == (1536, 2048, [])


def test_process_image_too_large_even_at_one_eighth():
  with pytest.raises(preprocessing.UnusableImage) as skip:  # pylint: disable=protected-access
    preprocessing.process_image(_jpeg(Image.new("RGB", (800, 800))), max_side=256, max_pixels=5_000)
  assert skip.value.reason == "too_large"


# ---------------------------------------------------------------------------------------------
# privattnet_jax.data.load_data_sources: the full-config entry point.


def _config(data_dir, **synthetic_fields):
  config = default.get_config()
  config.data.data_dir = str(data_dir)
  config.data.synthetic.update(
    {**dict(num_train=6, num_val=2, num_test=3, seed=0, image_size=32), **synthetic_fields}
  )
  return config


def test_load_data_sources_synthetic_default(tmp_path):
  sources = data.load_data_sources(_config(tmp_path).data)
  assert {s: len(v) for s, v in sources.items()} == {"train": 6, "validation": 2, "test": 3}
  assert synthetic.read_params(tmp_path / data.SYNTHETIC_SUBDIR)["num_train"] == 6
  builds = list(
    (tmp_path / data.SYNTHETIC_TFDS_SUBDIR).glob("*/vispr/max256/1.0.0/dataset_info.json")
  )
  assert len(builds) == 1
  assert not (tmp_path / "vispr").exists()  # Never where a real VISPR build goes.
  # Other generation parameters: regenerated and built afresh, not a stale build reused.
  sources = data.load_data_sources(_config(tmp_path, num_train=5).data)
  assert len(sources["train"]) == 5
  assert (
    len(
      list((tmp_path / data.SYNTHETIC_TFDS_SUBDIR).glob("*/vispr/max256/1.0.0/dataset_info.json"))
    )
    == 2
  )


def test_load_data_sources_real_layout(synthetic_root, tmp_path):
  config = _config(tmp_path)
  config.data.manual_dir = str(synthetic_root)
  config.data.splits_dir = str(synthetic_root)
  config.data.builder_config = "original"
  sources = data.load_data_sources(config.data)
  assert {s: len(v) for s, v in sources.items()} == {"train": 10, "validation": 4, "test": 4}
  assert (tmp_path / "vispr" / "original" / "1.0.0" / build_report.REPORT_FILENAME).is_file()
  assert not (tmp_path / data.SYNTHETIC_SUBDIR).exists()
  config.data.manual_dir = str(tmp_path / "missing")
  config.data.builder_config = "max256"
  with pytest.raises(vispr_layout.ManualDirError):
    data.load_data_sources(config.data)


def test_default_data_dir():
  config = _config("")
  assert data.resolve_data_dir(config.data) == pathlib.Path.home() / ".cache" / "privattnet_jax"


def test_concurrent_processes_share_one_build(tmp_path):
  # Processes of one job start together on a fresh data_dir: one generates and builds, the
  # others wait for it and reuse it (without the lock they delete each other's files).
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parent)!r})
      import test_vispr_builder as t
      from privattnet_jax import data
      sources = data.load_data_sources((t._config({str(tmp_path)!r})).data)
      print("SIZES", sorted((s, len(v)) for s, v in sources.items()))
  """)
  repo = pathlib.Path(__file__).resolve().parents[2]
  processes = [
    subprocess.Popen(
      [sys.executable, "-c", script],
      cwd=repo,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  for process in processes:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "SIZES [('test', 3), ('train', 6), ('validation', 2)]" in stdout
  assert len(list(tmp_path.glob("tfds_synthetic/*/vispr/max256/1.0.0/dataset_info.json"))) == 1
