"""A synthetic dataset in VISPR's exact on-disk format, with learnable, localised evidence.

    python -m privattnet_jax.data.synthetic --out DIR --num_train 2000 --num_val 400 \
        --num_test 400 --seed 0 [--image_size 160]

writes what a VISPR user has after extracting the real archives, so the real
builder reads it unchanged:

    DIR/images/{train2017,val2017,test2017}/2017_<id>.jpg
    DIR/annotations/{train2017,val2017,test2017}/2017_<id>.json
    DIR/{train2017,val2017,test2017}.txt     (split lists, as in data/splits)
    DIR/user_studies/*.tsv                   (copies of the bundled preference tables)
    DIR/synthetic_params.json                (what generated it; see ensure_synthetic)

Each annotation holds `id`, `image_path`, `labels`, plus extras the builder
ignores except `boxes`: `boxes` ([ymin, xmin, ymax, xmax] normalised, one per
planted object) and `box_labels` (the attribute of each box).

Evidence: each of about ten attributes spread over the preference range (from
a6_hair_color, 2.05 averaged over the 30 profiles, to a30_credit_card, 4.06) has
its own look, a distinct shape + colour + texture drawn procedurally. Non-safe
images get 1-3 different attributes at random positions and sizes (each object's
box covers 4%..16% of the image, log-uniform, so about one in six is under 5%),
over cluttered backgrounds (gradients, smooth colour noise, blobs, pixel noise)
with untextured, desaturated distractor shapes (polygons, stars, crosses, bars,
outlines) that are none of the looks. Safe images (`["a0_safe"]`, ~25%) hold no
object. Everything is deterministic given the seed: image i of a split depends
only on (seed, split, i), so a larger generation extends a smaller one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from privattnet_jax.data import attributes as attributes_lib
from privattnet_jax.data import synthetic_images

GENERATOR_VERSION = 1
MARKER_FILENAME = "synthetic_params.json"


# (VISPR folder / split list name, generate() argument); tfds calls them train, validation, test.
SPLITS = (("train2017", "num_train"), ("val2017", "num_val"), ("test2017", "num_test"))
ID_BASE = 90_000_000  # Synthetic ids 2017_9xxxxxxx; real VISPR ids start at 2017_1.
ID_SPLIT_STRIDE = 1_000_000
_CHUNK = 256  # Images per pool task.
# Below it, starting worker processes costs more than it saves (docs/benchmarks.md, "Figures behind
# constants").
_PARALLEL_MIN_IMAGES = 4096


def _params(
  num_train, num_val, num_test, seed, image_size, attributes_, safe_fraction, min_area, max_area
):
  return {
    "generator_version": GENERATOR_VERSION,
    "num_train": int(num_train),
    "num_val": int(num_val),
    "num_test": int(num_test),
    "seed": int(seed),
    "image_size": int(image_size),
    "attributes": list(attributes_),
    "safe_fraction": float(safe_fraction),
    "min_area": float(min_area),
    "max_area": float(max_area),
  }


def _validate(params: Mapping[str, Any]) -> None:
  unknown = [a for a in params["attributes"] if a not in synthetic_images.LOOKS]
  if unknown:
    raise ValueError(
      f"no synthetic look for {unknown}; available: {sorted(synthetic_images.LOOKS)}"
    )
  missing = [a for a in params["attributes"] if a not in attributes_lib.ATTRIBUTE_INDEX]
  if missing:
    raise ValueError(f"{missing} are not attributes of attributes.tsv")
  if not params["attributes"]:
    raise ValueError("at least one attribute is needed")
  if len(set(params["attributes"])) != len(params["attributes"]):
    raise ValueError(f"repeated attributes in {params['attributes']}")
  for key in ("num_train", "num_val", "num_test"):
    if not 0 <= params[key] < ID_SPLIT_STRIDE:
      raise ValueError(f"{key} must be in 0..{ID_SPLIT_STRIDE - 1}, got {params[key]}")
  if params["image_size"] < 16:
    raise ValueError(f"image_size must be >= 16, got {params['image_size']}")
  if not 0 <= params["safe_fraction"] <= 1:
    raise ValueError(f"safe_fraction must be in [0, 1], got {params['safe_fraction']}")
  if not 0 < params["min_area"] <= params["max_area"] < 0.8:
    raise ValueError(
      f"need 0 < min_area <= max_area < 0.8, got {params['min_area']}, {params['max_area']}"
    )


def image_id(split_index: int, index: int) -> str:
  """The id of image `index` of split `split_index` (0 train, 1 val, 2 test), e.g. 2017_90000000."""
  return f"2017_{ID_BASE + split_index * ID_SPLIT_STRIDE + index:08d}"


def generate(
  out_dir: str | os.PathLike,
  num_train: int,
  num_val: int,
  num_test: int,
  seed: int,
  image_size: int = 160,
  *,
  attributes: Sequence[str] = synthetic_images.DEFAULT_ATTRIBUTES,
  safe_fraction: float = synthetic_images.SAFE_FRACTION,
  min_area: float = synthetic_images.MIN_AREA,
  max_area: float = synthetic_images.MAX_AREA,
  workers: int = 0,
) -> pathlib.Path:
  """Writes the synthetic dataset into out_dir (created if needed) and returns its path.

  `workers` processes render the images (0: one per CPU); sets under a few thousand images are
  rendered in this process, where starting workers would cost more than it saves. The output
  does not depend on the worker count.

  Files of an earlier, larger generation in out_dir are not removed; use
  ensure_synthetic for a clean, cached generation.
  """
  params = _params(
    num_train, num_val, num_test, seed, image_size, attributes, safe_fraction, min_area, max_area
  )
  _validate(params)
  out = pathlib.Path(out_dir)
  counts = {
    "train2017": params["num_train"],
    "val2017": params["num_val"],
    "test2017": params["num_test"],
  }
  jobs = []  # (split_index, split, start, stop): chunks of images, rendered serially or in a pool.
  for split_index, (split, _) in enumerate(SPLITS):
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
    jobs += [
      (split_index, split, start, min(start + _CHUNK, counts[split]))
      for start in range(0, counts[split], _CHUNK)
    ]
  workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
  render = functools.partial(_write_images, out, params)
  if workers > 1 and sum(counts.values()) >= _PARALLEL_MIN_IMAGES:
    # spawn, not fork: the caller may be a process with JAX's threads running.
    with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
      chunks = list(pool.map(render, jobs))
  else:
    chunks = [render(job) for job in jobs]
  for split in counts:
    lines = [line for job, chunk in zip(jobs, chunks) if job[1] == split for line in chunk]
    (out / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines))
  (out / "user_studies").mkdir(exist_ok=True)
  for tsv in sorted(attributes_lib.USER_STUDIES_DIR.glob("*.tsv")):
    shutil.copyfile(tsv, out / "user_studies" / tsv.name)
  (out / MARKER_FILENAME).write_text(json.dumps(params, indent=1))
  return out


def _write_images(
  out: pathlib.Path, params: Mapping[str, Any], job: tuple[int, str, int, int]
) -> list[str]:
  """Renders and writes images start .. stop - 1 of a split; returns their annotation paths.

  Image i of split s depends on (seed, s, i) alone, so the files do not depend on the chunking
  or the worker count.
  """
  split_index, split, start, stop = job
  relatives = []
  for i in range(start, stop):
    rng = np.random.default_rng([params["seed"], split_index, i])
    image, labels, boxes, box_labels = synthetic_images.render_image(
      rng,
      params["image_size"],
      params["attributes"],
      params["safe_fraction"],
      params["min_area"],
      params["max_area"],
    )
    ident = image_id(split_index, i)
    image_path = f"images/{split}/{ident}.jpg"
    image.save(out / image_path, format="JPEG", quality=92)
    annotation = {
      "id": ident,
      "image_path": image_path,
      "labels": labels,
      "boxes": [[round(v, 6) for v in box] for box in boxes],
      "box_labels": box_labels,
      "source": "privattnet_jax synthetic",
    }
    relative = f"annotations/{split}/{ident}.json"
    (out / relative).write_text(json.dumps(annotation))
    relatives.append(relative)
  return relatives


def read_params(out_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The parameters of the generation in out_dir, or None when there is none (or unreadable)."""
  try:
    return json.loads((pathlib.Path(out_dir) / MARKER_FILENAME).read_text())
  except (OSError, ValueError):
    return None


def ensure_synthetic(
  out_dir: str | os.PathLike,
  *,
  num_train: int,
  num_val: int,
  num_test: int,
  seed: int,
  image_size: int = 160,
  attributes: Sequence[str] = synthetic_images.DEFAULT_ATTRIBUTES,
  safe_fraction: float = synthetic_images.SAFE_FRACTION,
  min_area: float = synthetic_images.MIN_AREA,
  max_area: float = synthetic_images.MAX_AREA,
) -> pathlib.Path:
  """out_dir holding a generation with these parameters: reused if its marker matches, else made.

  A different earlier generation (recognised by its marker) is replaced; a
  non-empty out_dir without a marker is never touched (ValueError). The new
  generation is written beside out_dir and renamed into place, so an interrupted
  run leaves no half-written dataset behind a valid marker.
  """
  params = _params(
    num_train, num_val, num_test, seed, image_size, attributes, safe_fraction, min_area, max_area
  )
  _validate(params)
  out = pathlib.Path(out_dir).expanduser()
  if read_params(out) == params:
    return out
  if out.exists() and any(out.iterdir()) and read_params(out) is None:
    raise ValueError(
      f"{out} is not empty and holds no {MARKER_FILENAME}: not a synthetic dataset, left untouched"
    )
  out.parent.mkdir(parents=True, exist_ok=True)
  _remove_dead_tmp_dirs(out)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  try:
    generate(
      tmp,
      num_train,
      num_val,
      num_test,
      seed,
      image_size,
      attributes=attributes,
      safe_fraction=safe_fraction,
      min_area=min_area,
      max_area=max_area,
    )
  except BaseException:  # A full disk or an interrupt: no half-written folder stays behind.
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if read_params(out) == params:  # Another process finished the same generation meanwhile.
    shutil.rmtree(tmp)
    return out
  if out.exists():
    shutil.rmtree(out)
  try:
    os.replace(tmp, out)
  except OSError:
    # Another process put a generation there in the meantime; use it if it is the same.
    shutil.rmtree(tmp, ignore_errors=True)
    if read_params(out) != params:
      raise
  return out


def _remove_dead_tmp_dirs(out: pathlib.Path) -> None:
  """Deletes the temporary generations of processes that died (killed) before renaming theirs."""
  for tmp in out.parent.glob(f".{out.name}.tmp-*"):
    pid = tmp.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(tmp, ignore_errors=True)
    except OSError:  # Alive under another user: not ours to remove.
      pass


def params_digest(params: Mapping[str, Any]) -> str:
  """A short stable hash of generation parameters (names cached builds of that generation)."""
  return hashlib.sha256(json.dumps(dict(params), sort_keys=True).encode()).hexdigest()[:12]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="Folder to write the dataset into.")
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_val", type=int, default=400)
  parser.add_argument("--num_test", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--image_size", type=int, default=160, help="Side of the square images, in pixels."
  )
  parser.add_argument(
    "--attributes",
    default=",".join(synthetic_images.DEFAULT_ATTRIBUTES),
    help=f"Comma-separated attribute ids with a look; available: {','.join(sorted(synthetic_images.LOOKS))}.",
  )
  parser.add_argument("--safe_fraction", type=float, default=synthetic_images.SAFE_FRACTION)
  parser.add_argument(
    "--min_area",
    type=float,
    default=synthetic_images.MIN_AREA,
    help="Smallest object box, as a fraction of the image.",
  )
  parser.add_argument("--max_area", type=float, default=synthetic_images.MAX_AREA)
  parser.add_argument("--workers", type=int, default=0, help="Rendering processes; 0: one per CPU.")
  args = parser.parse_args(argv)
  out = generate(
    args.out,
    args.num_train,
    args.num_val,
    args.num_test,
    args.seed,
    args.image_size,
    attributes=[a for a in args.attributes.split(",") if a],
    safe_fraction=args.safe_fraction,
    min_area=args.min_area,
    max_area=args.max_area,
    workers=args.workers,
  )
  print(
    f"Wrote {args.num_train} / {args.num_val} / {args.num_test} synthetic VISPR images to {out}"
  )


if __name__ == "__main__":
  main()
