"""VISPR data: the TFDS builder over the real layout and the synthetic VISPR-format generator."""

from __future__ import annotations

import contextlib
import pathlib
import time
from typing import Any

from absl import logging

DEFAULT_DATA_DIR = "~/.cache/privattnet_jax"
SYNTHETIC_SUBDIR = "synthetic_vispr"  # <data_dir>/synthetic_vispr: the generated VISPR-layout root.
SYNTHETIC_TFDS_SUBDIR = (
  "tfds_synthetic"  # <data_dir>/tfds_synthetic/<params hash>: its TFDS builds.
)
LOCK_FILENAME = ".prepare.lock"


@contextlib.contextmanager
def _exclusive(data_dir: pathlib.Path):
  """Serialises generation and building across processes sharing data_dir.

  Several processes of one job, or two jobs: the first builds, the others wait and then reuse its
  build.
  """
  data_dir.mkdir(parents=True, exist_ok=True)
  try:
    import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only.
  except ImportError:
    yield
    return
  with open(data_dir / LOCK_FILENAME, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def resolve_data_dir(data) -> pathlib.Path:
  """The `data` section's data_dir, or ~/.cache/privattnet_jax when empty."""
  return pathlib.Path(data.data_dir or DEFAULT_DATA_DIR).expanduser()


def prepare_builder(data):
  """The prepared `vispr` builder for the `data` config section: real VISPR, or the synthetic set.

  With data.manual_dir set, VISPR is built from it into data_dir. With it
  empty, the synthetic dataset is generated (cached by its parameters) at
  data.synthetic.dir, default <data_dir>/synthetic_vispr, and built into
  <data_dir>/tfds_synthetic/<hash of the generation parameters>, so a synthetic
  build never collides with a real one, nor with another generation's build.
  """
  data_dir = resolve_data_dir(data)
  with _exclusive(data_dir):
    return _prepare_builder(data, data_dir)


def _prepare_builder(data, data_dir: pathlib.Path):
  from privattnet_jax.data import synthetic, vispr  # pylint: disable=g-import-not-at-top

  if data.manual_dir:
    return vispr.prepare(
      pathlib.Path(data.manual_dir).expanduser(),
      data_dir,
      data.builder_config,
      data.splits_dir,
      data.strict,
    )
  syn = data.synthetic
  syn_dir = pathlib.Path(syn.dir).expanduser() if syn.dir else data_dir / SYNTHETIC_SUBDIR
  if data.splits_dir:
    logging.warning(
      "config.data.splits_dir=%s is ignored: the synthetic dataset has its own split lists.",
      data.splits_dir,
    )
  start = time.time()
  root = synthetic.ensure_synthetic(
    syn_dir,
    num_train=syn.num_train,
    num_val=syn.num_val,
    num_test=syn.num_test,
    seed=syn.seed,
    image_size=syn.image_size,
  )
  params = synthetic.read_params(root)
  tfds_dir = data_dir / SYNTHETIC_TFDS_SUBDIR / synthetic.params_digest(params)
  generated = time.time()
  builder = vispr.prepare(root, tfds_dir, data.builder_config, splits_dir=root, strict=data.strict)
  logging.info(
    "synthetic dataset (%d/%d/%d images of %d px) ready in %.1f s, its TFDS build in %.1f s",
    syn.num_train,
    syn.num_val,
    syn.num_test,
    syn.image_size,
    generated - start,
    time.time() - generated,
  )
  return builder


def load_data_sources(data) -> dict[str, Any]:
  """{split: random-access source} for the `data` config section (docs/design.md).

  Splits train, validation, test; records hold the encoded JPEG (undecoded),
  image_id, labels, height, width and boxes.
  """
  from privattnet_jax.data import vispr  # pylint: disable=g-import-not-at-top

  return vispr.data_sources(prepare_builder(data))


__all__ = ["load_data_sources", "prepare_builder", "resolve_data_dir", "DEFAULT_DATA_DIR"]
