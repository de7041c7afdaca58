"""TFDS builder `vispr`: VISPR's annotation JSONs + images -> array_record, TensorFlow-free.

The builder reads the three split lists (bundled copies by default), opens each
annotation JSON, follows its `image_path` from the dataset root, normalises the
image to an RGB JPEG (shorter side <= 256 px in the default `max256` config) and
writes `array_record` files that `builder.as_data_source()` reads without
TensorFlow. Records are documented in docs/design.md.

Real downloads are messy, so every annotation ends in exactly one of three ways:
written unchanged, written after a conversion (grayscale, CMYK, palette, alpha,
16-bit, EXIF rotation, oversize), or skipped for a named reason. Nothing is
dropped silently: the build report (counts and ids per reason and per split) is
logged, printed and saved as `build_report.json` in the built dataset's version
folder, and `strict=True` turns any skip into an error.

Decisions (documented in the README):
- Annotations, images and split lists are read through `safe_files`: a path from
  an annotation or a split list must resolve (symlinks followed) inside the manual
  dir, else the record is skipped as `outside_root` without being read; only
  regular files are opened (a FIFO, device or folder is `not_a_regular_file`), each
  read is size-bounded, and a symlink loop is `symlink_loop` (docs/faults.md).
- A label outside the 68 attributes skips the whole example (`unknown_label`)
  rather than dropping the label: the score is a max over the labels, so a
  dropped label could silently lower an image's risk.
- Images are checked against `max_pixels` (default: PIL's MAX_IMAGE_PIXELS,
  ~89.5 MP) on the size actually decoded. JPEGs larger than that are decoded
  through libjpeg's DCT scaling (`draft`, 1/2, 1/4 or 1/8) down to the limit and
  counted as `downscaled_too_large`; other formats, or JPEGs still too large at
  1/8, are skipped as `too_large`. PIL's own bomb check (which would refuse such
  a JPEG at open) is suspended while one image is opened and decoded, because
  ours, on the decoded size, replaces it.
- The same `max_pixels` holds in the `original` config: an oversize JPEG is
  stored at the reduced size there too.
- `height`/`width` are the original image's size after its EXIF orientation is
  applied (the image as a viewer shows it), before any downscaling.
- An annotation without `id` takes its file name's stem as the id. `boxes`
  (optional, synthetic data) are taken as given, relative to the displayed image.
- Transparent pixels are composited on white; 16-bit images are scaled, not
  clipped (see `_to_8bit`).
- RGB JPEGs that need no change (no rotation, resize or conversion) are stored
  byte for byte (no generational loss); everything else is re-encoded at
  `jpeg_quality`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from privattnet_jax.data import attributes
from privattnet_jax import safe_files
from privattnet_jax.inference import preprocessing
from privattnet_jax.data import build_report
from privattnet_jax.data import vispr_layout


CITATION = """@inproceedings{orekondy17iccv,
  title = {Towards a Visual Privacy Advisor: Understanding and Predicting Privacy Risks in Images},
  author = {Orekondy, Tribhuvanesh and Schiele, Bernt and Fritz, Mario},
  booktitle = {International Conference on Computer Vision (ICCV)},
  year = {2017},
}"""


class StrictBuildError(RuntimeError):
  """strict=True and the build skipped annotations.

  The message's first line sums up, the rest lists them.
  """


class StaleBuildError(ValueError):
  """A built dataset whose annotations or split lists have changed since: it is not reused."""


@dataclasses.dataclass(eq=False)
class VisprConfig(tfds.core.BuilderConfig):
  """max_side: the shorter side is downscaled to at most this (0 keeps the original size).

  jpeg_quality: quality of re-encoded images.
  """

  max_side: int = 256
  jpeg_quality: int = 90


class Vispr(tfds.core.GeneratorBasedBuilder):
  """VISPR images with their 68 privacy attributes, as RGB JPEGs in array_record files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: RGB JPEG, labels, original size, boxes, build report."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = vispr_layout.MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
    VisprConfig(
      name="max256",
      max_side=preprocessing.BUILDER_MAX_SIDES["max256"],
      description="Shorter side <= 256 px (the pipeline's input).",
    ),
    VisprConfig(
      name="original",
      max_side=preprocessing.BUILDER_MAX_SIDES["original"],
      description="Original size, normalised to RGB JPEG.",
    ),
  ]
  DEFAULT_CONFIG_NAME = "max256"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file, found without tfds' own lookup.

    tfds' lookup goes through the `importlib_resources` backport, which etils only installs with
    its `epath` extra; without it, building fails for any builder that lives in a package.
    """
    return epath.Path(inspect.getfile(cls))

  def __init__(
    self,
    *,
    splits_dir: str | os.PathLike = "",
    strict: bool = False,
    max_pixels: int | None | str = "pil",
    file_format: str | None = None,
    **kwargs,
  ):
    """Builder options beyond tfds' own (data_dir, config, version).

    Args:
      splits_dir: folder holding train2017.txt, val2017.txt, test2017.txt; empty:
        the copies bundled in data/splits.
      strict: raise StrictBuildError, listing every skip, instead of building a
        dataset without them.
      max_pixels: limit on decoded pixels per image; "pil" (default) takes PIL's
        Image.MAX_IMAGE_PIXELS as it is now; None: no limit.
      file_format: tfds file format; default array_record (the only one
        `as_data_source` reads).
      **kwargs: data_dir, config, version.
    """
    self._splits_dir = pathlib.Path(splits_dir) if splits_dir else attributes.SPLITS_DIR
    self._strict = bool(strict)
    self._max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels == "pil" else max_pixels
    self._split_reports: dict[str, build_report.SplitReport] = {}
    self._manual_root: pathlib.Path | None = None
    self._last_report: dict[str, Any] | None = None
    super().__init__(file_format=file_format or "array_record", **kwargs)
    # Keep the options when tfds pickles the builder (it re-runs __init__ from this state).
    self._original_state.update(
      splits_dir=os.fspath(self._splits_dir),
      strict=self._strict,
      max_pixels=self._max_pixels,
      file_format=file_format,
    )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "VISPR (Orekondy et al., ICCV 2017): 22,167 images annotated with 68 privacy attributes. "
        "Images are stored as RGB JPEG; skipped and converted images are listed in build_report.json."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "image_id": tfds.features.Text(),
          "labels": tfds.features.Tensor(shape=(attributes.NUM_ATTRIBUTES,), dtype=np.bool_),
          "height": np.int32,
          "width": np.int32,
          "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        }
      ),
      homepage=vispr_layout.HOMEPAGE,
      citation=CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access  # checked by us, not tfds
    lists = vispr_layout.check_manual_dir(manual_dir, self._splits_dir)
    self._manual_root = pathlib.Path(os.fspath(manual_dir))
    self._split_reports = {split: build_report.SplitReport() for split in vispr_layout.SPLIT_FILES}
    return {split: self._generate_examples(split, paths) for split, paths in lists.items()}

  def _generate_examples(
    self, split: str, annotation_paths: Sequence[str]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    report = self._split_reports[split]
    written: set[str] = set()
    config: VisprConfig = self.builder_config
    for relative in annotation_paths:
      report.listed += 1
      fallback_id = pathlib.PurePosixPath(relative).stem
      image_id = fallback_id
      try:
        image_id, example, conversions = self._example(relative, fallback_id, written, config)
      except build_report.Skip as skip:
        image_id = skip.image_id or image_id
        report.skip(skip.reason, image_id, skip.message)
        logging.warning("vispr %s: skipped %s (%s: %s)", split, image_id, skip.reason, skip.message)
        continue
      for kind in conversions:
        report.convert(kind, image_id)
      written.add(image_id)
      report.written += 1
      report.written_ids.append(image_id)
      yield image_id, example

  def _example(self, relative: str, fallback_id: str, written: set[str], config: VisprConfig):
    try:
      data = vispr_layout.read_contained(
        self._manual_root, relative, "annotation", safe_files.MAX_ANNOTATION_BYTES, fallback_id
      )
    except build_report.Skip as skip:  # The report names the entry as the split list spells it.
      raise build_report.Skip(
        skip.reason,
        f"split list entry '{safe_files.printable(relative)}': {skip.message}",
        skip.image_id,
      ) from None
    image_id, image_path, labels, boxes = vispr_layout.parse_annotation(data, fallback_id)
    if image_id in written:
      raise build_report.Skip(
        "duplicate_id", f"{image_id} already written to this split ({relative})", image_id
      )
    image_file = self._manual_root / image_path
    image_data = vispr_layout.read_contained(
      self._manual_root, image_path, "image", safe_files.MAX_IMAGE_BYTES, image_id
    )
    try:
      encoded, height, width, conversions = preprocessing.process_image(
        image_data,
        max_side=config.max_side,
        jpeg_quality=config.jpeg_quality,
        max_pixels=self._max_pixels,
      )
    except preprocessing.UnusableImage as skip:
      raise build_report.Skip(skip.reason, f"{image_file}: {skip.message}", image_id) from None
    example = {
      "image": encoded,
      "image_id": image_id,
      "labels": attributes.multi_hot(labels),
      "height": height,
      "width": width,
      "boxes": boxes,
    }
    return image_id, example, conversions

  def _report_meta(self) -> dict[str, Any]:
    config: VisprConfig = self.builder_config
    return {
      "builder": self.name,
      "config": config.name,
      "version": str(self.version),
      "manual_dir": os.fspath(self._manual_root.resolve()) if self._manual_root else "",
      "splits_dir": os.fspath(self._splits_dir.resolve()),
      "split_lists_sha256": vispr_layout.split_lists_digest(self._splits_dir),
      "inputs_sha256": vispr_layout.inputs_digest(self._manual_root, self._splits_dir)
      if self._manual_root
      else "",
      "strict": self._strict,
      "max_side": config.max_side,
      "jpeg_quality": config.jpeg_quality,
      "max_pixels": self._max_pixels,
      "unknown_label_policy": vispr_layout.UNKNOWN_LABEL_POLICY,
      "skip_reason_meanings": build_report.SKIP_REASONS,
      "conversion_meanings": build_report.CONVERSIONS,
    }

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    report = build_report.report_json(self._report_meta(), self._split_reports)
    self._last_report = report
    if self._strict and report["total"]["skipped"]:
      text = build_report.format_report(report, max_ids=10**9)
      print(text, flush=True)
      raise StrictBuildError(
        f"strict build: {report['total']['skipped']} annotations would be skipped\n{text}"
      )
    # self.data_dir is the incomplete folder here; tfds renames it to the version folder.
    path = pathlib.Path(os.fspath(self.data_dir)) / build_report.REPORT_FILENAME
    path.write_text(json.dumps(report, indent=1))

  def download_and_prepare(self, **kwargs):
    """tfds' download_and_prepare, then the build report is logged and printed."""
    self._last_report = None
    super().download_and_prepare(**kwargs)
    if self._last_report is not None:
      text = build_report.format_report(self._last_report)
      logging.info("%s", text)
      print(
        f"{text}\n  full report: {pathlib.Path(os.fspath(self.data_path)) / build_report.REPORT_FILENAME}",
        flush=True,
      )


def prepare(
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  config_name: str = "max256",
  splits_dir: str | os.PathLike = "",
  strict: bool = False,
  *,
  max_pixels: int | None | str = "pil",
) -> Vispr:
  """The `vispr` builder over `manual_dir`, built into `data_dir` unless already built there.

  A reused build is checked against its report: with strict=True, a build that
  skipped anything raises StrictBuildError; changed split lists or annotations
  (their digest, `vispr_layout.inputs_digest`) raise StaleBuildError (delete the version folder to
  rebuild); the same content under another manual dir is logged as a warning. Without
  `splits_dir`, the split lists at the manual dir's root are used when it has all
  three, else the bundled VISPR lists (`vispr_layout.resolve_splits_dir`); the log says which.
  """
  splits_dir = vispr_layout.resolve_splits_dir(manual_dir, splits_dir)
  logging.info(
    "Split lists: %s",
    ", ".join(os.fspath(splits_dir / name) for name in vispr_layout.SPLIT_FILES.values()),
  )
  builder = Vispr(
    data_dir=os.fspath(data_dir),
    config=config_name,
    splits_dir=splits_dir,
    strict=strict,
    max_pixels=max_pixels,
  )
  data_path = pathlib.Path(os.fspath(builder.data_path))
  if (data_path / "dataset_info.json").exists():
    _check_reused(data_path, manual_dir, splits_dir, strict)
    return builder
  vispr_layout.check_manual_dir(manual_dir, splits_dir)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)),
    file_format="array_record",
  )
  return builder


def _check_reused(data_path, manual_dir, splits_dir, strict) -> None:
  report_path = data_path / build_report.REPORT_FILENAME
  if not report_path.exists():
    logging.warning(
      "Reusing %s, which has no %s: its skips are unknown.", data_path, build_report.REPORT_FILENAME
    )
    if strict:
      raise StrictBuildError(
        f"strict: {data_path} has no {build_report.REPORT_FILENAME}; delete it to rebuild"
      )
    return
  report = json.loads(report_path.read_text())
  logging.info("Reusing %s (built from %s).", data_path, report.get("manual_dir"))
  if strict and report["total"]["skipped"]:
    raise StrictBuildError(
      f"strict: the existing build {data_path} skipped {report['total']['skipped']} annotations\n"
      + build_report.format_report(report, max_ids=10**9)
    )
  if os.fspath(pathlib.Path(manual_dir).resolve()) != report.get("manual_dir"):
    logging.warning(
      "%s was built from %s, not %s (same annotations and split lists).",
      data_path,
      report.get("manual_dir"),
      manual_dir,
    )
  if "inputs_sha256" not in report:
    logging.warning(
      "%s records no digest of its inputs: it cannot be checked against %s", data_path, manual_dir
    )
    return
  changed = (
    "split lists"
    if vispr_layout.split_lists_digest(splits_dir) != report.get("split_lists_sha256")
    else "annotations"
    if vispr_layout.inputs_digest(manual_dir, splits_dir) != report["inputs_sha256"]
    else None
  )
  if changed:
    raise StaleBuildError(
      f"the {changed} in {manual_dir} changed since the dataset in {data_path} was built from them; "
      f"delete {data_path} to rebuild it (it is not reused)"
    )


def data_sources(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """{split: random-access source}; `image` stays encoded JPEG bytes (SkipDecoding)."""
  sources = builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})
  return {str(split): source for split, source in sources.items()}
