"""The flags of the modes beyond train and evaluate (predict, redact, export, compare, multi-host).

run.py imports this module for its definitions; only run.py reads the values.
"""

from absl import flags

flags.DEFINE_multi_string(
  "images",
  [],
  "predict, redact: image files, folders (searched recursively) or globs; "
  "more paths may follow as plain arguments.",
)
flags.DEFINE_string(
  "output",
  None,
  "predict, redact: the output folder; export: the artifact folder (default "
  "<workdir>/export); compare: the markdown file.",
)
flags.DEFINE_string(
  "exported",
  None,
  "predict, redact: run the artifact in this folder instead of a --workdir checkpoint.",
)
flags.DEFINE_list("workdirs", [], "compare: the runs' workdirs, comma separated.")
flags.DEFINE_integer(
  "profile", None, "predict: also give (redact: redact for) profile K's (0..29) score."
)
flags.DEFINE_string(
  "preferences",
  None,
  "predict: also give the score for these ratings (TSV as "
  "data/user_studies/user_profiles.tsv with one rating column; attribute models).",
)
flags.DEFINE_integer(
  "batch_size", 32, "predict, redact: images per batch (padded, so that it compiles once)."
)
flags.DEFINE_bool(
  "heatmaps",
  True,
  "predict: write heat map panels (attention models); redact: before/after panels.",
)
flags.DEFINE_enum(
  "heatmap_normalisation",
  "per_map",
  ("per_map", "global"),
  "predict: min-max scale each step's map alone, or all steps of an image together.",
)
flags.DEFINE_integer(
  "panel_size", 256, "predict, redact: longer side of each panel tile, in pixels."
)
flags.DEFINE_integer(
  "top_attributes", 5, "predict: attribute models' most probable attributes to list."
)
flags.DEFINE_integer(
  "max_pixels",
  None,
  "predict, redact: refuse images with more pixels (decompression bombs; "
  "JPEGs are decoded reduced instead); default: Pillow's limit.",
)
flags.DEFINE_integer(
  "loader_processes",
  0,
  "predict, redact: read photos in this many worker processes (0: threads); "
  "faster for camera-size photos on a many-core host.",
)
flags.DEFINE_enum(
  "method", "blur", ("blur", "pixelate", "fill"), "redact: how regions are redacted."
)
flags.DEFINE_float(
  "target_score",
  None,
  "redact: stop when the score is at or below this; default: the "
  "score of a safe image under the checkpoint's target (see --target_drop).",
)
flags.DEFINE_float(
  "target_drop",
  None,
  "redact: stop when this fraction of each photo's own score is gone (instead of --target_score).",
)
flags.DEFINE_float("max_area", 0.25, "redact: the most of a photo's area that may be redacted.")
flags.DEFINE_bool(
  "keep_metadata",
  False,
  "redact: keep EXIF, XMP and the ICC profile (default: every output is written without metadata).",
)
flags.DEFINE_list("export_platforms", ["cpu", "cuda"], "export: platforms to lower for.")
flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() (multi-host GPU or TPU runs); "
  "the coordinator flags below are for clusters it cannot detect itself.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, with --distributed.")
