"""Redaction (--mode=redact): regions, formats, orientation, metadata, the greedy rounds, bad files,
the quality comparison, and the command line on a tiny trained checkpoint.

Most tests use a hand-made "texture" predictor whose risk is the image's fine detail and whose
attention is where that detail lies, so that what redaction must achieve is known exactly; the
command-line test runs a real (tiny) checkpoint end to end.
"""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image, ImageOps

from privattnet_jax.data import attributes
from privattnet_jax.evaluation import report
from privattnet_jax.inference import output_folders, predict, preprocessing, redact
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.training import serving
from privattnet_jax.inference import redaction
from privattnet_jax.inference import metadata
from privattnet_jax.evaluation import redaction_quality
from tests import tiny_runs

REPO = pathlib.Path(__file__).resolve().parents[2]
GRID = 8
SIZE = (96, 72)  # (width, height) of the test photos.
PATCH = (56, 36, 88, 64)  # (x0, y0, x1, y1) of the detailed, "private" patch.


def _detail(images: np.ndarray) -> np.ndarray:
  """Per-pixel fine detail of normalised images: |grey - its 3x3 mean|, (B, S, S)."""
  pixels = images * preprocessing.IMAGENET_STD + preprocessing.IMAGENET_MEAN
  grey = pixels.mean(axis=-1)
  padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
  height, width = grey.shape[1:]
  local = (
    sum(padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)) / 9
  )
  return np.abs(grey - local)


def texture_predictor(
  image_size: int = 64, steps: int = 2, batch_size: int = 8
) -> predictor_lib.Predictor:
  """Risk = 20 x the mean fine detail; attention = each grid cell's share of the detail."""
  info = {
    "model": "texture",
    "image_size": image_size,
    "max_side": 256,
    "grid_shape": [GRID, GRID],
    "steps": steps,
    "num_scores": 1,
    "outputs": {"score": ["batch", 1], "attention": ["batch", steps, GRID * GRID]},
    "score": {"pooling": "max", "source": "profiles_mean", "per_profile": False},
    "preferences": attributes.preference_table("profiles_mean").tolist(),
  }

  def infer(images, mask):
    del mask
    detail = _detail(images)
    cell = image_size // GRID
    energy = (
      detail.reshape(len(images), GRID, cell, GRID, cell).mean(axis=(2, 4)).reshape(len(images), -1)
      + 1e-4
    )
    attention = np.repeat((energy / energy.sum(axis=1, keepdims=True))[:, None], steps, axis=1)
    return {"score": 20 * detail.mean(axis=(1, 2))[:, None], "attention": attention}

  return predictor_lib.Predictor(info, batch_size, infer)


def smooth_photo(size=SIZE) -> Image.Image:
  width, height = size
  y, x = np.mgrid[0:height, 0:width]
  pixels = np.stack([60 + x * 1.5, 80 + y * 1.5, 150 + 0 * x], -1)
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def risky_photo(size=SIZE, patch=PATCH) -> Image.Image:
  """The smooth photo with a black-and-white checkerboard (2 px squares) in `patch`."""
  pixels = np.array(smooth_photo(size))
  x0, y0, x1, y1 = patch
  y, x = np.mgrid[y0:y1, x0:x1]
  pixels[y0:y1, x0:x1] = (((x // 2 + y // 2) % 2) * 255)[..., None]
  return Image.fromarray(pixels)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _gps_exif() -> Image.Exif:
  """EXIF with a GPS position (52.5163 N, 13.3777 E, 34 m), device, owner and timestamps."""
  exif = Image.Exif()
  exif[0x010F], exif[0x0110], exif[0x013B] = "Nikon", "Z 6", "Jane Doe"
  exif[0x0132] = "2024:05:01 10:00:00"
  exif.get_ifd(0x8769).update({0x9003: "2024:05:01 09:59:58", 0xA431: "SN123456"})
  exif.get_ifd(0x8825).update(
    {1: "N", 2: (52.0, 30.0, 58.68), 3: "E", 4: (13.0, 22.0, 39.72), 5: b"\x00", 6: 34.0}
  )
  return exif


XMP = (
  b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
  b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="Jane Doe"/></rdf:RDF></x:xmpmeta>'
)


def _run(tmp_path, names_and_bytes: dict, predictor=None, **settings):
  photos = tmp_path / "photos"
  photos.mkdir(exist_ok=True)
  for name, data in names_and_bytes.items():
    (photos / name).write_bytes(data)
  options = {k: settings.pop(k) for k in list(settings) if k in ("panels", "max_pixels")}
  result = redact.redact_photos(
    predictor or texture_predictor(),
    [str(photos / n) for n in names_and_bytes],
    tmp_path / "out",
    redact.RedactSettings(**settings),
    progress=False,
    **options,
  )
  return result, {pathlib.Path(r["path"]).name: r for r in result.records}


# ----------------------------------------------------------------------------
# Masks, regions and the redaction operations.


def test_grow_mask_adds_the_most_salient_pixels_up_to_the_area():
  saliency = np.arange(100, dtype=np.float32).reshape(10, 10)
  mask = redaction.grow_mask(np.zeros((10, 10), bool), saliency, 0.2)
  assert mask.sum() == 20 and mask[8:].all()  # The 20 largest values: the last two rows.
  grown = redaction.grow_mask(
    mask, -saliency, 0.3
  )  # Keeps what it had, adds the 10 now most salient.
  assert grown.sum() == 30 and (grown & mask).sum() == 20 and grown[0].all()
  assert redaction.grow_mask(grown, saliency, 0.1).sum() == 30  # Never shrinks.


def test_regions_are_the_components_boxes_scaled_outward():
  mask = np.zeros((8, 8), bool)
  mask[1:3, 1:4] = True
  mask[5:8, 6:8] = True
  assert redaction.mask_regions(mask) == [(1, 1, 4, 3), (6, 5, 8, 8)]
  assert redaction.scale_boxes([(1, 1, 4, 3)], (8, 8), (20, 12)) == [(2, 1, 10, 5)]


@pytest.mark.parametrize("method", redaction.METHODS)
def test_redaction_changes_the_masked_pixels_and_nothing_else(method):
  image = np.asarray(risky_photo())
  mask = np.zeros(image.shape[:2], bool)
  mask[PATCH[1] : PATCH[3], PATCH[0] : PATCH[2]] = True
  out = redaction.redact_array(image, mask, method)
  np.testing.assert_array_equal(out[~mask], image[~mask])
  inside = _detail(redaction.normalise_images(out[None]))[0][mask]
  before = _detail(redaction.normalise_images(image[None]))[0][mask]
  assert inside.mean() < 0.25 * before.mean()  # The checkerboard's detail is gone.
  if method == "fill":
    assert (out[mask] == redaction.FILL_COLOUR).all()


def test_model_pixels_invert_the_normalisation_exactly():
  image = np.asarray(risky_photo().resize((32, 32)))
  np.testing.assert_array_equal(redaction.model_pixels(preprocessing.normalize(image)), image)


def test_strip_jpeg_metadata_keeps_the_image_data_byte_for_byte():
  data = _encoded(
    risky_photo(), "JPEG", quality=90, exif=_gps_exif(), xmp=XMP, comment=b"Jane's phone"
  )
  stripped = metadata.strip_jpeg_metadata(data)
  assert b"Exif" not in stripped and b"xmpmeta" not in stripped and b"Jane" not in stripped
  assert stripped[stripped.index(b"\xff\xda") :] == data[data.index(b"\xff\xda") :]
  np.testing.assert_array_equal(
    np.asarray(Image.open(io.BytesIO(stripped))), np.asarray(Image.open(io.BytesIO(data)))
  )
  with pytest.raises(ValueError):
    metadata.strip_jpeg_metadata(b"\x89PNG\r\n")


# ----------------------------------------------------------------------------
# Photos in, photos out.


def test_score_goes_down_and_the_regions_cover_the_private_patch(tmp_path):
  predictor = texture_predictor()
  result, records = _run(
    tmp_path, {"risky.png": _encoded(risky_photo(), "PNG")}, predictor, target_drop=0.6
  )
  record = records["risky.png"]
  assert record["ok"] and result.num_failed == 0
  assert record["score_after"] <= record["target"] == pytest.approx(0.4 * record["score_before"])
  assert (
    record["target_reached"]
    and 1 <= record["rounds"]
    and 0 < record["area"] <= redaction.DEFAULT_MAX_AREA
  )
  x0, y0, x1, y1 = (
    np.min([b[:2] for b in record["regions"]], 0).tolist()
    + np.max([b[2:] for b in record["regions"]], 0).tolist()
  )
  assert x0 <= PATCH[0] + 4 and y0 <= PATCH[1] + 4 and x1 >= PATCH[2] - 4 and y1 >= PATCH[3] - 4
  # The written photo, scored as predict scores it, is far less risky than the original.
  load = lambda path: (
    predict.load_image(path, image_size=64, max_side=256, max_pixels=None).model_input
  )
  scores = predictor(
    np.stack([load(tmp_path / "photos" / "risky.png"), load(tmp_path / "out" / record["output"])])
  )
  assert scores["score"][1, 0] < 0.5 * scores["score"][0, 0]
  assert scores["score"][0, 0] == pytest.approx(
    record["score_before"], rel=1e-5
  )  # Predict's own score.
  assert (tmp_path / "out" / record["panel"]).is_file()


def test_candidates_of_all_photos_are_scored_together_each_round(tmp_path):
  predictor = texture_predictor(batch_size=64)
  calls, infer = [], predictor.infer
  predictor.infer = lambda images, mask: (calls.append(int(mask.sum())), infer(images, mask))[1]
  patches = [PATCH, (8, 8, 40, 36), (30, 20, 62, 48)]
  files = {
    f"risky{i}.png": _encoded(risky_photo(patch=patch), "PNG") for i, patch in enumerate(patches)
  }
  _, records = _run(
    tmp_path, files, predictor, target_score=-1.0
  )  # Unreachable: rounds up to max_area.
  rounds = max(r["rounds"] for r in records.values())
  assert rounds >= 2 and all(
    r["area"] <= redaction.DEFAULT_MAX_AREA + 1e-9 for r in records.values()
  )
  assert calls[:2] == [
    3,
    3 * redaction.CANDIDATES,
  ]  # The photos, then every photo's candidates, in one call each.
  assert len(calls) <= 2 + rounds
  assert all(r["score_after"] < r["score_before"] for r in records.values())


def test_max_area_caps_the_redaction(tmp_path):
  _, records = _run(
    tmp_path, {"risky.png": _encoded(risky_photo(), "PNG")}, target_score=-1.0, max_area=0.05
  )
  record = records["risky.png"]
  assert not record["target_reached"] and record["area"] == pytest.approx(0.05, abs=0.01)


def test_sizes_orientation_and_formats_are_kept(tmp_path):
  stored = risky_photo()
  files = {
    "rotated.jpg": _encoded(stored, "JPEG", quality=95, exif=_orientation(6)),
    "photo.png": _encoded(stored, "PNG"),
    "photo.webp": _encoded(stored, "WEBP", quality=95),
    "photo.tiff": _encoded(stored, "TIFF"),
    "photo.bmp": _encoded(stored, "BMP"),
    "grey.png": _encoded(stored.convert("L"), "PNG"),
    "alpha.png": _encoded(stored.convert("RGBA"), "PNG"),
  }
  _, records = _run(tmp_path, files, target_drop=0.5)
  upright = np.asarray(
    ImageOps.exif_transpose(Image.open(io.BytesIO(files["rotated.jpg"]))).convert("RGB"), float
  )
  for name, record in records.items():
    assert record["ok"], record
    out = Image.open(tmp_path / "out" / record["output"])
    source = Image.open(io.BytesIO(files[name]))
    assert (
      pathlib.Path(record["output"]).suffix == pathlib.Path(name).suffix
      and out.format == source.format
    )
    expected_size = SIZE[::-1] if name == "rotated.jpg" else SIZE
    assert out.size == expected_size == (record["width"], record["height"])
    assert record["area"] > 0 and record["score_after"] < record["score_before"]
  assert len({r["output"] for r in records.values()}) == len(files)  # photo.png, photo-2.webp, ...
  assert Image.open(tmp_path / "out" / "grey.png").mode == "L"
  assert Image.open(tmp_path / "out" / "alpha.png").mode == "RGBA"
  # The rotated JPEG is written upright: away from the redacted regions it matches the upright source.
  out = np.asarray(Image.open(tmp_path / "out" / "rotated.jpg").convert("RGB"), float)
  untouched = np.ones(out.shape[:2], bool)
  for x0, y0, x1, y1 in records["rotated.jpg"]["regions"]:
    untouched[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = False
  assert untouched.mean() > 0.3 and np.abs(out - upright)[untouched].mean() < 4


def _orientation(value: int) -> Image.Exif:
  exif = Image.Exif()
  exif[0x0112] = value
  return exif


def test_no_metadata_is_left_and_the_row_lists_it(tmp_path):
  exif = _gps_exif()
  files = {
    "risky.jpg": _encoded(
      risky_photo(), "JPEG", quality=95, exif=exif, xmp=XMP, comment=b"Jane's phone"
    ),
    "safe.jpg": _encoded(
      smooth_photo(), "JPEG", quality=95, exif=exif, xmp=XMP, comment=b"Jane's phone"
    ),
    "risky.png": _encoded(risky_photo(), "PNG", exif=exif),
    "safe.webp": _encoded(smooth_photo(), "WEBP", exif=exif, xmp=XMP),
    "risky.tiff": _encoded(risky_photo(), "TIFF", exif=exif),
  }
  _, records = _run(tmp_path, files, target_score=0.3)
  assert not records["safe.jpg"]["regions"] and records["risky.jpg"]["regions"]
  tiff = records.pop(
    "risky.tiff"
  )  # Pillow's TIFF writer keeps the main IFD's tags, not the GPS / EXIF IFDs.
  assert (
    tiff["metadata_found"]["owner"] == {"artist": "Jane Doe"}
    and "make" in tiff["metadata_found"]["device"]
  )
  assert not metadata.find_metadata(Image.open(tmp_path / "out" / tiff["output"]))
  assert b"Jane" not in (tmp_path / "out" / tiff["output"]).read_bytes()
  for name, record in records.items():
    found = record["metadata_found"]
    assert found["gps"] == {
      "latitude": pytest.approx(52.5163),
      "longitude": pytest.approx(13.3777),
      "altitude": pytest.approx(34.0),
    }, name
    assert found["device"] == {"make": "Nikon", "model": "Z 6", "body_serial_number": "SN123456"}
    assert found["owner"] == {"artist": "Jane Doe"}
    assert found["timestamps"] == {
      "date_time": "2024:05:01 10:00:00",
      "date_time_original": "2024:05:01 09:59:58",
    }
    assert set(record["metadata_removed"]) == set(found)
    data = (tmp_path / "out" / record["output"]).read_bytes()
    out = Image.open(io.BytesIO(data))
    assert not out.getexif() and not metadata.find_metadata(out), name
    for secret in (b"Exif", b"Nikon", b"SN123456", b"Jane", b"xmpmeta", b"2024:05:01"):
      assert secret not in data, (name, secret)
  assert (
    "xmp" in records["risky.jpg"]["metadata_found"]
    and "comment" in records["safe.jpg"]["metadata_found"]
  )
  with open(tmp_path / "out" / "redaction.csv", newline="") as f:
    rows = {pathlib.Path(row["path"]).name: row for row in csv.DictReader(f)}
  assert json.loads(rows["safe.jpg"]["gps"])["latitude"] == pytest.approx(52.5163)
  assert "gps" in rows["risky.png"]["metadata_removed"].split(";")


def test_keep_metadata_writes_it_back(tmp_path):
  files = {"risky.jpg": _encoded(risky_photo(), "JPEG", quality=95, exif=_gps_exif())}
  _, records = _run(tmp_path, files, target_drop=0.5, keep_metadata=True)
  assert records["risky.jpg"]["metadata_removed"] == [] and records["risky.jpg"]["area"] > 0
  out = Image.open(tmp_path / "out" / "risky.jpg")
  assert out.getexif().get_ifd(0x8825)[1] == "N"


def test_a_safe_photo_is_left_alone(tmp_path):
  safe = smooth_photo()
  files = {
    "safe.jpg": _encoded(safe, "JPEG", quality=90, exif=_gps_exif()),
    "safe.png": _encoded(safe, "PNG"),
  }
  _, records = _run(tmp_path, files, target_score=0.3)
  for name, record in records.items():
    assert record["ok"] and record["score_before"] <= 0.3, record
    assert record["rounds"] == 0 and record["area"] == 0 and record["regions"] == []
    assert record["score_after"] == record["score_before"]
    original = np.asarray(Image.open(io.BytesIO(files[name])))
    np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / "out" / record["output"])), original
    )
  # The JPEG is its own image data, cut of the metadata segments: no re-encoding.
  out = (tmp_path / "out" / "safe.jpg").read_bytes()
  assert out == metadata.strip_jpeg_metadata(files["safe.jpg"])


def test_a_photo_redaction_cannot_make_safer_is_left_alone_under_a_relative_target(tmp_path):
  _, records = _run(tmp_path, {"safe.png": _encoded(smooth_photo(), "PNG")}, target_drop=0.5)
  record = records["safe.png"]
  assert not record["target_reached"] and record["rounds"] == 0 and record["area"] == 0
  assert record["score_after"] == record["score_before"]


def test_hostile_files_get_error_rows_and_the_rest_is_redacted(tmp_path):
  files = {name: make() for name, (make, _) in tiny_runs.BROKEN.items()}
  files["risky.png"] = _encoded(risky_photo(), "PNG")
  result, records = _run(tmp_path, files, target_drop=0.5)
  assert result.num_failed == len(tiny_runs.BROKEN) and records["risky.png"]["ok"]
  for name, (_, word) in tiny_runs.BROKEN.items():
    assert records[name]["ok"] is False and word in records[name]["error"], records[name]
    assert not (tmp_path / "out" / name).exists()
  lines = [
    json.loads(line) for line in (tmp_path / "out" / "redaction.jsonl").read_text().splitlines()
  ]
  assert lines == result.records
  with open(tmp_path / "out" / "redaction.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [row["status"] for row in rows] == ["ok" if r["ok"] else "error" for r in lines]


def test_an_input_is_never_overwritten(tmp_path):
  """An output folder holding the input is refused before anything is written (docs/faults.md)."""
  (tmp_path / "risky.png").write_bytes(_encoded(risky_photo(), "PNG"))
  before = (tmp_path / "risky.png").read_bytes()
  with pytest.raises(output_folders.OutputFolderError, match="holds the input"):
    redact.redact_photos(
      texture_predictor(),
      [str(tmp_path / "risky.png")],
      tmp_path,
      redact.RedactSettings(target_drop=0.5),
      progress=False,
    )
  assert (tmp_path / "risky.png").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["risky.png"]


def test_bad_settings_and_models_without_attention_are_refused():
  for settings, message in (
    (redact.RedactSettings(target_score=1, target_drop=0.5), "not both"),
    (redact.RedactSettings(target_drop=1.5), "target_drop"),
    (redact.RedactSettings(target_score=float("nan")), "target_score must be a finite number"),
    (redact.RedactSettings(max_area=0), "max_area"),
    (redact.RedactSettings(method="smudge"), "method"),
  ):
    with pytest.raises(predictor_lib.PredictError, match=message):
      settings.check()
  no_attention = texture_predictor()
  no_attention.info["outputs"] = {"score": ["batch", 1]}
  with pytest.raises(predictor_lib.PredictError, match="attention"):
    redaction.scorer(no_attention)


def test_safe_score_is_the_targets_score_of_a_safe_image():
  info = texture_predictor().info
  assert redaction.safe_score(info) == 0.0  # a0_safe has preference 0 in every table.


# ----------------------------------------------------------------------------
# Animations and files of several images: no frame dropped silently.


def _frames(count: int = 4) -> list[Image.Image]:
  """The risky photo `count` times, each frame with its own grey level in the top-left corner."""
  frames = []
  for index in range(count):
    pixels = np.array(risky_photo())
    pixels[:8, :8] = 60 * index
    frames.append(Image.fromarray(pixels))
  return frames


def _animation(fmt: str) -> bytes:
  frames = _frames()
  durations = [100, 150, 200, 250]
  return _encoded(
    frames[0], fmt, save_all=True, append_images=frames[1:], duration=durations, loop=0
  )


@pytest.mark.parametrize("fmt, name", [("GIF", "a.gif"), ("WEBP", "a.webp"), ("PNG", "a.png")])
def test_every_frame_of_an_animation_is_redacted_with_the_same_mask(tmp_path, fmt, name):
  _, records = _run(tmp_path, {name: _animation(fmt)}, target_drop=0.5)
  record = records[name]
  assert record["ok"] and record["frames"] == record["frames_written"] == 4, record
  assert record["area"] > 0 and "first_frame" in record["conversions"]
  source = Image.open(io.BytesIO(_animation(fmt)))
  written = Image.open(tmp_path / "out" / record["output"])
  assert written.format == fmt and written.n_frames == 4 and written.info.get("loop") == 0
  x0, y0, x1, y1 = PATCH
  durations = []
  for index in range(4):
    source.seek(index)
    written.seek(index)
    written.load()
    durations.append(round(written.info["duration"]))
    before = np.asarray(source.convert("RGB"), np.float64)
    after = np.asarray(written.convert("RGB"), np.float64)
    assert np.abs(after[y0:y1, x0:x1] - before[y0:y1, x0:x1]).mean() > 30, index  # Redacted.
    assert np.abs(after[:8, :8] - 60 * index).mean() < 12, index  # This frame, in its place.
  assert durations == [100, 150, 200, 250]
  predictor = texture_predictor()
  predictor.info["attribute_ids"] = None
  predicted = predict.predict(
    predictor, [str(tmp_path / "photos" / name)], tmp_path / "scores", progress=False
  )
  row = predicted.records[0]  # Predict scores the first frame and says so.
  assert row["ok"] and row["frames"] == 4 and "first_frame" in row["conversions"]


def test_pages_are_refused_and_too_many_frames_are_too_large_each_for_itself(tmp_path):
  frames = _frames()
  files = {
    "pages.tiff": _encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
    "long.gif": _animation("GIF"),
    "still.png": _encoded(risky_photo(), "PNG"),
  }
  max_pixels = 3 * SIZE[0] * SIZE[1]  # Three frames' worth: one still photo fits, four do not.
  result, records = _run(tmp_path, files, target_drop=0.5, max_pixels=max_pixels)
  assert records["pages.tiff"]["error"].startswith("multi_frame: a TIFF of 4 frames")
  assert records["long.gif"]["error"].startswith("too_large: 4 frames of 96x72")
  assert records["still.png"]["ok"] and records["still.png"]["frames"] == 1
  assert result.num_failed == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
    "panels",
    "redaction.csv",
    "redaction.jsonl",
    "still.png",
  ]


def test_the_extra_images_of_an_mpo_are_metadata_removed(tmp_path):
  frames = _frames(2)
  mpo = _encoded(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
  _, records = _run(tmp_path, {"phone.jpg": mpo}, target_drop=0.5)
  record = records["phone.jpg"]
  assert record["ok"] and record["frames"] == 2 and record["frames_written"] == 1
  assert record["metadata_found"]["extra_images"] == {"count": 1}
  assert "extra_images" in record["metadata_removed"]
  assert Image.open(tmp_path / "out" / record["output"]).format == "JPEG"


# ----------------------------------------------------------------------------
# Quality: attention against random regions and a centred box.


def test_attention_beats_random_and_centred_regions_on_off_centre_patches():
  rng = np.random.default_rng(0)
  images, boxes = [], []
  for _ in range(6):
    x0, y0 = (
      int(rng.integers(0, 12)),
      int(rng.choice([0, 40])),
    )  # Left edge, top or bottom: off centre.
    images.append(np.asarray(risky_photo((64, 64), (x0, y0, x0 + 20, y0 + 20))))
    boxes.append([[y0 / 64, x0 / 64, (y0 + 20) / 64, (x0 + 20) / 64]])
  score = redaction.scorer(texture_predictor())
  summary, greedy = redaction_quality.redaction_quality(
    score, np.stack(images), np.array(boxes), np.ones(6, int), (GRID, GRID), target_drop=0.7
  )
  assert summary["num_images"] == 6 and greedy.masks.shape == (6, 64, 64)
  assert summary["mean_drop"]["attention"] > 2 * summary["mean_drop"]["random"]
  assert summary["mean_drop"]["attention"] > 2 * summary["mean_drop"]["centred"]
  assert summary["box_coverage"] > 0.6 and summary["target_reached"] == 1.0
  assert summary["mean_area"] == pytest.approx(greedy.areas.mean())


def test_report_section_compares_the_drops_and_marks_regions_that_raise_the_risk():
  summary = {
    "num_images": 3,
    "method": "fill",
    "target_drop": 0.5,
    "target_score": None,
    "max_area": 0.25,
    "target_reached": 1 / 3,
    "mean_area": 0.12,
    "mean_score_before": 3.0,
    "box_coverage": 0.7,
    "box_area": 0.14,
    "mean_drop": {"attention": 1.2, "random": -0.1, "centred": 0.3},
  }
  panel = Image.new("RGB", (8, 4))
  blocks = report.redaction_blocks(summary, [panel])
  assert (
    blocks[0] == ("heading", 2, "Redaction") and "until 50% of their score is gone" in blocks[1][1]
  )
  assert "cover 70% of the boxes' area" in blocks[1][1]
  table = blocks[2]
  assert table[2] == [
    ["attention-guided", "1.200", "1.000"],
    ["random, same area", "-0.100", report.MISSING],
    ["centred box, same area", "0.300", "4.000"],
  ]
  assert blocks[3][0] == "image" and blocks[3][2].size == (8, 4)


# ----------------------------------------------------------------------------
# The command line, on a real tiny checkpoint.


def test_command_line_redacts_from_an_artifact_alone_as_the_checkpoint_does(
  tiny_data_dir, tmp_path
):
  """A tiny trained run: redact in process from its checkpoint, and with run.py from its exported
  artifact with the model code made unimportable; the same scores and regions."""
  workdir = tiny_runs.train_tiny_run(tiny_data_dir, tmp_path / "run", "privattnet")
  exported = serving.export_predictor(workdir, platforms=("cpu",))
  photos = tmp_path / "photos"
  photos.mkdir()
  (photos / "photo.jpg").write_bytes(_encoded(risky_photo(), "JPEG", quality=95, exif=_gps_exif()))
  (photos / "empty.jpg").write_bytes(b"")
  settings = redact.RedactSettings(method="pixelate", target_drop=0.9, max_area=0.1)
  expected = redact.redact_photos(
    serving.load_checkpoint_predictor(workdir, batch_size=4),
    [str(photos)],
    tmp_path / "checkpoint",
    settings,
    progress=False,
  ).records
  out = tmp_path / "artifact"
  script = f"""
    import runpy, sys
    for name in ("privattnet_jax.training.train", "privattnet_jax.models", "privattnet_jax.training.checkpoints"):
      sys.modules[name] = None  # import fails
    sys.argv = ["run.py", "--mode=redact", "--exported={exported}", "--output={out}", "--batch_size=4",
                "--method=pixelate", "--target_drop=0.9", "--max_area=0.1", "--images", "{photos}"]
    runpy.run_path("run.py", run_name="__main__")
  """
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(script)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "1 images failed" in result.stderr and "1 of 2 images redacted" in result.stdout
  records = [json.loads(line) for line in (out / "redaction.jsonl").read_text().splitlines()]
  assert (
    [r["ok"] for r in records] == [r["ok"] for r in expected] == [False, True]
  )  # empty.jpg, photo.jpg
  record, reference = records[1], expected[1]
  assert record["method"] == "pixelate" and record["score_after"] <= record["score_before"]
  assert record["score_before"] == pytest.approx(reference["score_before"], rel=1e-4)
  assert record["score_after"] == pytest.approx(reference["score_after"], rel=1e-4)
  assert record["regions"] == reference["regions"] and record["area"] <= 0.1 + 1e-9
  assert "gps" in record["metadata_removed"]
  written = Image.open(out / "photo.jpg")
  assert written.size == SIZE and not written.getexif()
