"""The demo on real photographs: a VISPR-format set built from scikit-image's photos.

    python -m benchmarks.real_photos_benchmark --out /tmp/real_photos [--variants privattnet,ap_pr]

Writes a VISPR-layout folder (images, annotations with boxes, its own split lists at the root,
1,200 / 200 / 400 images of 256 px), then trains `configs/demo.py:<variant>` on it through
`data.manual_dir` alone, as a user with their own small dataset would, and prints each
variant's test metrics (every variant by default), the attribute mAP of the attribute models
with their score under the earlier `product` rule beside it (the same checkpoint), and the
attention mass inside the boxes against the boxes' area share.

Images: a random crop of a real photo (astronaut's lower half, cat, coffee, rocket, Hubble,
retina, motorcycle, brick, grass, ...) with 0-2 sensitive objects and 1-3 distractors pasted on:
- faces (`a9_face_complete`): the 100 LFW faces of `skimage.data.lfw_subset()`;
- printed text (`a26_handwriting`): crops of `skimage.data.page()`;
- text in a street photo (`a103_license_plate_complete`): crops of `skimage.data.text()`;
- distractors: the 100 LFW non-face patches and crops of `skimage.data.coins()`.
Faces and non-faces are both 25 x 25 grey patches, so only their content tells them apart. A
benchmark, not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time

import numpy as np
import skimage.data
from absl import logging
from PIL import Image, ImageEnhance

from privattnet_jax.data import attributes

SIZE = 256
SPLITS = (("train2017", 1200), ("val2017", 200), ("test2017", 400))
ID_BASE = 80_000_000


def _rgb(array) -> Image.Image:
  array = np.asarray(array)
  if array.dtype != np.uint8:
    array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
  image = Image.fromarray(array)
  return image.convert("RGB")


def _backgrounds() -> list[Image.Image]:
  motorcycle = skimage.data.stereo_motorcycle()
  photos = [
    skimage.data.astronaut()[300:],
    skimage.data.cat(),
    skimage.data.coffee(),
    skimage.data.rocket(),
    skimage.data.hubble_deep_field(),
    skimage.data.immunohistochemistry(),
    skimage.data.retina(),
    motorcycle[0],
    motorcycle[1],
    skimage.data.brick(),
    skimage.data.grass(),
    skimage.data.gravel(),
    skimage.data.moon(),
    skimage.data.clock(),
    skimage.data.camera()[380:],
  ]
  return [_rgb(photo) for photo in photos]


def _objects() -> dict[str, list[Image.Image]]:
  lfw = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces.
  page, text, coins = skimage.data.page(), skimage.data.text(), skimage.data.coins()
  return {
    "a9_face_complete": [_rgb(face) for face in lfw[:100]],
    "a26_handwriting": [page],
    "a103_license_plate_complete": [text],
    "non_face": [_rgb(patch) for patch in lfw[100:]],
    "coins": [coins],
  }


def _patch(rng: np.random.Generator, kind: str, pool: list, side: int) -> Image.Image:
  source = pool[rng.integers(len(pool))]
  if isinstance(source, np.ndarray):  # A large photo: a random square crop of it.
    crop = int(rng.uniform(0.25, 0.6) * min(source.shape[:2]))
    top, left = rng.integers(source.shape[0] - crop + 1), rng.integers(source.shape[1] - crop + 1)
    source = _rgb(source[top : top + crop, left : left + crop])
  patch = source.resize((side, side), Image.BILINEAR)
  if rng.random() < 0.5 and kind not in ("a26_handwriting", "a103_license_plate_complete"):
    patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
  return ImageEnhance.Brightness(patch).enhance(rng.uniform(0.8, 1.2))


def _image(
  rng: np.random.Generator, backgrounds, objects
) -> tuple[Image.Image, list[str], list[list[float]], list[str]]:
  photo = backgrounds[rng.integers(len(backgrounds))]
  crop = int(rng.uniform(0.4, 1.0) * min(photo.size))
  left, top = rng.integers(photo.size[0] - crop + 1), rng.integers(photo.size[1] - crop + 1)
  image = photo.crop((left, top, left + crop, top + crop)).resize((SIZE, SIZE), Image.BILINEAR)
  if rng.random() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  sensitive = ["a9_face_complete", "a26_handwriting", "a103_license_plate_complete"]
  count = 0 if rng.random() < 0.25 else int(rng.integers(1, 3))
  kinds = list(rng.choice(sensitive, size=count, replace=False)) + [
    ("non_face", "coins")[int(rng.integers(2))] for _ in range(int(rng.integers(1, 4)))
  ]
  placed, labels, boxes, box_labels = [], [], [], []
  for kind in kinds:
    side = int(np.sqrt(rng.uniform(0.02, 0.06)) * SIZE)
    for _ in range(20):  # Rejection sampling against overlaps.
      x, y = int(rng.integers(0, SIZE - side)), int(rng.integers(0, SIZE - side))
      if all(x + side <= a or a + s <= x or y + side <= b or b + s <= y for a, b, s in placed):
        break
    else:
      continue
    placed.append((x, y, side))
    image.paste(_patch(rng, kind, objects[kind], side), (x, y))
    if kind in sensitive:
      labels.append(kind)
      boxes.append([y / SIZE, x / SIZE, (y + side) / SIZE, (x + side) / SIZE])
      box_labels.append(kind)
  return image, sorted(set(labels)) or [attributes.SAFE_ATTRIBUTE], boxes, box_labels


def build(out: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """Writes the VISPR-format set into `out` (replacing it) and returns it."""
  shutil.rmtree(out, ignore_errors=True)
  backgrounds, objects = _backgrounds(), _objects()
  for split_index, (split, count) in enumerate(SPLITS):
    (out / "images" / split).mkdir(parents=True)
    (out / "annotations" / split).mkdir(parents=True)
    lines = []
    for index in range(count):
      rng = np.random.default_rng([seed, split_index, index])
      image, labels, boxes, box_labels = _image(rng, backgrounds, objects)
      ident = f"2017_{ID_BASE + split_index * 1_000_000 + index}"
      image.save(out / "images" / split / f"{ident}.jpg", quality=92)
      annotation = {
        "id": ident,
        "image_path": f"images/{split}/{ident}.jpg",
        "labels": labels,
        "boxes": [[round(v, 6) for v in box] for box in boxes],
        "box_labels": box_labels,
      }
      (out / "annotations" / split / f"{ident}.json").write_text(json.dumps(annotation))
      lines.append(f"annotations/{split}/{ident}.json\n")
    (out / f"{split}.txt").write_text("".join(lines))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="where the VISPR-format set and the runs go")
  parser.add_argument(
    "--variants", default="privattnet,privattnet_mlc,privnet,ap_pr,pr_cnn", help="demo.py variants"
  )
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  from configs import demo  # pylint: disable=g-import-not-at-top
  from privattnet_jax.training import train  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(args.out)
  start = time.time()
  root = build(out / "vispr", args.seed)
  print(f"built {root} in {time.time() - start:.0f} s")
  for variant in args.variants.split(","):
    config = demo.get_config(variant)
    config.data.manual_dir = str(root)
    config.data.data_dir = str(out / "tfds")
    workdir = out / "runs" / variant.replace(",", "_")
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.time()
    train.train_and_evaluate(config, str(workdir))
    metrics = json.loads((workdir / "eval_test.json").read_text())
    line = (
      f"{variant}: test L1 {metrics['l1']:.3f} Pearson {metrics['pearson']:.3f} "
      f"Spearman {metrics['spearman']:.3f} (n={metrics['n']}), {time.time() - start:.0f} s"
    )
    if "table" in metrics:
      table = metrics["table"]
      line += f"; table row L1 {table['l1']:.3f} Pearson {table['pearson']:.3f} Spearman {table['spearman']:.3f}"
    if "attribute_map" in metrics:
      line += f"; attribute mAP {metrics['attribute_map']:.3f}; {_product_rule(config, workdir)}"
    if "localisation" in metrics:
      line += f"; localisation {json.dumps(metrics['localisation'])}"
    print(line, flush=True)


def _product_rule(config, workdir: pathlib.Path) -> str:
  """The test metrics of the same checkpoint under score.attribute_rule='product' (no files written)."""
  from privattnet_jax.training import evaluator  # pylint: disable=g-import-not-at-top
  from privattnet_jax.training import experiment as experiment_lib  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.score.attribute_rule = "product"
  experiment = experiment_lib.Experiment(config, workdir, need_train=False)
  state = experiment.restore(experiment.manager.best_step())
  metrics = evaluator.evaluate(
    state,
    experiment.eval_fn,
    experiment.feed.eval_batches("test"),
    experiment.mesh,
    experiment.task,
  ).metrics
  return (
    f"product rule: L1 {metrics['l1']:.3f} Pearson {metrics['pearson']:.3f} "
    f"Spearman {metrics['spearman']:.3f}"
  )


if __name__ == "__main__":
  main()
