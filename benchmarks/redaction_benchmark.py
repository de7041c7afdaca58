"""Redaction: quality on the synthetic demo's risky test images, and the time per camera photo.

  python -m benchmarks.redaction_benchmark --workdir=/tmp/demo
  python -m benchmarks.redaction_benchmark --workdir=/tmp/demo --skip_quality --megapixels=12 --repeats=3

Quality: the synthetic test split's images with boxes (read from the generated VISPR layout, as a
user's photos: predict.load_image), redacted greedily along the attention (redaction_quality.redaction_quality)
for each --methods, until --target_drop of each score is gone and, separately, down to the safe
score (the default target of --mode=redact); prints the mean risk drop of attention-guided,
random and centred regions of the same area, their ratio, and the share of the boxes' area the
attention's masks cover.

Time: a --megapixels 4:3 JPEG (a test image upscaled, with sensor noise and GPS EXIF), redacted
end to end (decode, scoring rounds, full-size redaction, encode, panel) by redact.redact_photos
after a warm-up run that compiles; prints the median wall time and the time of each stage. The
CPU count JAX and Pillow may use is what the machine has; run it on quiet cores.
"""

import io
import json
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from privattnet_jax.inference import predict
from privattnet_jax.inference import redact
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.training import serving
from privattnet_jax.inference import redaction
from privattnet_jax.inference import photos
from privattnet_jax.evaluation import redaction_quality

flags.DEFINE_string("workdir", None, "A trained demo run (configs/demo.py).", required=True)
flags.DEFINE_string(
  "synthetic_dir", "~/.cache/privattnet_jax/synthetic_vispr", "The generated VISPR layout."
)
flags.DEFINE_string("split", "test2017", "Split folder of the synthetic layout.")
flags.DEFINE_integer("max_images", 0, "Use at most this many risky images (0: all).")
flags.DEFINE_list("methods", ["blur", "pixelate", "fill"], "Redaction methods to measure.")
flags.DEFINE_float("target_drop", 0.5, "Quality: the share of each score to remove.")
flags.DEFINE_float("max_area", redaction.DEFAULT_MAX_AREA, "The area cap.")
flags.DEFINE_integer("batch_size", 32, "Predictor batch (quality).")
flags.DEFINE_bool("skip_quality", False, "Only the timing.")
flags.DEFINE_float("megapixels", 12.0, "Timing: the photo's size (0: no timing).")
flags.DEFINE_integer("repeats", 3, "Timing: measured runs.")
flags.DEFINE_integer(
  "timing_batch_size", 8, "Timing: predictor batch (one photo: up to 4 candidates a round)."
)
FLAGS = flags.FLAGS


def risky_images(
  synthetic_dir: pathlib.Path, split: str, image_size: int, max_side: int, limit: int
):
  """(uint8 (N, S, S, 3) model pixels, (N, M, 4) boxes, (N,) box counts, paths) of the images with boxes."""
  annotations = sorted((synthetic_dir / "annotations" / split).glob("*.json"))
  if not annotations:
    raise SystemExit(
      f"no annotations in {synthetic_dir / 'annotations' / split}: train the demo first"
    )
  pixels, boxes, paths = [], [], []
  for path in annotations:
    annotation = json.loads(path.read_text())
    if not annotation.get("boxes"):
      continue
    image_path = synthetic_dir / annotation["image_path"]
    loaded = predict.load_image(
      image_path, image_size=image_size, max_side=max_side, max_pixels=None
    )
    pixels.append(redaction.model_pixels(loaded.model_input))
    boxes.append(annotation["boxes"])
    paths.append(image_path)
    if limit and len(pixels) == limit:
      break
  width = max(len(b) for b in boxes)
  padded = np.zeros((len(boxes), width, 4))
  for i, b in enumerate(boxes):
    padded[i, : len(b)] = b
  return np.stack(pixels), padded, np.array([len(b) for b in boxes]), paths


def quality(predictor: predictor_lib.Predictor) -> None:
  info = predictor.info
  pixels, boxes, counts, _ = risky_images(
    pathlib.Path(FLAGS.synthetic_dir).expanduser(),
    FLAGS.split,
    info["image_size"],
    info["max_side"],
    FLAGS.max_images,
  )
  score = redaction.scorer(predictor)
  grid_shape = tuple(info["grid_shape"])
  print(f"{len(pixels)} risky {FLAGS.split} images, grid {grid_shape}, max_area {FLAGS.max_area}")
  print(
    "method   | target            | n   | score before | area  | reached | drop attention | drop random | "
    "drop centred | x random | x centred | box coverage | seconds"
  )
  for method in FLAGS.methods:
    for label, target in (
      (f"drop {FLAGS.target_drop:.0%}", None),
      ("safe score", redaction.safe_score(info)),
    ):
      start = time.perf_counter()
      summary, _ = redaction_quality.redaction_quality(
        score,
        pixels,
        boxes,
        counts,
        grid_shape,
        target_drop=FLAGS.target_drop,
        target_score=target,
        method=method,
        max_area=FLAGS.max_area,
      )
      seconds = time.perf_counter() - start
      drop = summary["mean_drop"]

      def ratio(value):
        return f"{value:.2f}" if value is not None else "-"

      print(
        f"{method:8s} | {label:17s} | {summary['num_images']:3d} | {summary['mean_score_before']:12.3f} | "
        f"{summary['mean_area']:.3f} | {summary['target_reached']:7.2f} | {drop['attention']:14.3f} | "
        f"{drop['random']:11.3f} | {drop['centred']:12.3f} | {ratio(summary['drop_ratio_random']):>8s} | "
        f"{ratio(summary['drop_ratio_centred']):>9s} | {summary['box_coverage']:12.2f} | {seconds:7.1f}",
        flush=True,
      )


def camera_photo(source: pathlib.Path, megapixels: float) -> bytes:
  """A 4:3 JPEG of about `megapixels` from a small image: upscaled, with sensor noise and GPS EXIF."""
  width = int(round(np.sqrt(megapixels * 1e6 * 4 / 3)))
  height = width * 3 // 4
  image = Image.open(source).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
  noise = np.random.default_rng(0).normal(0, 6, (height, width, 3))
  image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
  exif = Image.Exif()
  exif[0x010F], exif[0x0110] = "Benchmark", "Camera"
  exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 8.0, 0.0), 3: "E", 4: (11.0, 34.0, 0.0)})
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=92, exif=exif)
  return buffer.getvalue()


def timing(predictor: predictor_lib.Predictor) -> None:
  info = predictor.info
  _, _, _, paths = risky_images(
    pathlib.Path(FLAGS.synthetic_dir).expanduser(),
    FLAGS.split,
    info["image_size"],
    info["max_side"],
    1,
  )
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    photo = tmp / "photo.jpg"
    photo.write_bytes(camera_photo(paths[0], FLAGS.megapixels))
    size, megabytes = Image.open(photo).size, photo.stat().st_size / 1e6
    settings = redact.RedactSettings(target_drop=FLAGS.target_drop)
    redact.redact_photos(
      predictor, [str(photo)], tmp / "warmup", settings, progress=False
    )  # Compiles.
    totals = []
    for repeat in range(FLAGS.repeats):
      start = time.perf_counter()
      result = redact.redact_photos(
        predictor, [str(photo)], tmp / f"run{repeat}", settings, progress=False
      )
      totals.append(time.perf_counter() - start)
    record = result.records[0]
    # The stages alone, once more.
    load = time.perf_counter()
    loaded = photos.load_photo(
      photo,
      image_size=info["image_size"],
      max_side=info["max_side"],
      max_pixels=Image.MAX_IMAGE_PIXELS,
      panel_size=predict.PANEL_SIZE,
    )
    rounds = time.perf_counter()
    outcome = redaction.greedy_redactions(
      redaction.scorer(predictor),
      redaction.model_pixels(loaded.loaded.model_input)[None],
      lambda before: before * (1 - FLAGS.target_drop),
      tuple(info["grid_shape"]),
    )
    finish = time.perf_counter()
    data, *_ = redact._finish(loaded, outcome.masks[0], settings)  # pylint: disable=protected-access
    end = time.perf_counter()
  print(
    f"{size[0]}x{size[1]} JPEG ({megabytes:.1f} MB, written {len(data) / 1e6:.1f} MB): "
    f"median {np.median(totals):.2f} s over {FLAGS.repeats} runs ({', '.join(f'{t:.2f}' for t in totals)}); "
    f"area {record['area']:.3f}, rounds {record['rounds']}, score {record['score_before']:.2f} -> "
    f"{record['score_after']:.2f}"
  )
  print(
    f"stages: load (predict's checks + full decode) {rounds - load:.2f} s, scoring rounds {finish - rounds:.2f} s, "
    f"full-size redaction + encode {end - finish:.2f} s (the rest: panel, rows, threads)"
  )


def main(argv):
  del argv
  predictor = serving.load_checkpoint_predictor(FLAGS.workdir, batch_size=FLAGS.batch_size)
  if not FLAGS.skip_quality:
    quality(predictor)
  if FLAGS.megapixels > 0:
    timing(serving.load_checkpoint_predictor(FLAGS.workdir, batch_size=FLAGS.timing_batch_size))


if __name__ == "__main__":
  app.run(main)
