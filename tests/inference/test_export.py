"""The exported predictor: its JSON, agreement with the checkpoint, and predict from the artifact alone."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from privattnet_jax.data import attributes
from privattnet_jax.inference import predict
from privattnet_jax.inference import preprocessing
from privattnet_jax.inference import predictor as predictor_lib
from privattnet_jax.training import serving
from tests import tiny_runs

REPO = pathlib.Path(__file__).resolve().parents[2]
PHOTOS = ("photo.jpg", "rgba.png", "gray.png", "rotated.jpg", "photo.webp")


@pytest.fixture(scope="module")
def run(tiny_data_dir, tmp_path_factory):
  """A PrivAttNet_MLC (attention maps and 67 attribute probabilities), trained two steps."""
  return tiny_runs.train_tiny_run(
    tiny_data_dir, tmp_path_factory.mktemp("export_run") / "mlc", "privattnet_mlc"
  )


@pytest.fixture(scope="module")
def exported_dir(run, tmp_path_factory):
  """The artifact, moved away from the workdir (predict from it must not need the checkpoint)."""
  written = serving.export_predictor(run)
  assert written == run / "export"
  moved = tmp_path_factory.mktemp("artifact") / "export"
  shutil.move(str(written), moved)
  return moved


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  return tiny_runs.write_photos(tmp_path_factory.mktemp("photos"), PHOTOS, broken=False)


def test_json_holds_the_preprocessing_and_outputs(exported_dir):
  info = json.loads((exported_dir / predictor_lib.EXPORT_INFO_FILE).read_text())
  assert (
    info["format"] == predictor_lib.EXPORT_FORMAT
    and info["model"] == "privattnet_mlc"
    and info["kind"] == "attributes"
  )
  assert info["image_size"] == 32 and info["max_side"] == 256
  np.testing.assert_allclose(info["image_mean"], preprocessing.IMAGENET_MEAN)
  np.testing.assert_allclose(info["image_std"], preprocessing.IMAGENET_STD)
  assert info["input"]["shape"] == ["batch", 32, 32, 3] and info["input"]["dtype"] == "float32"
  assert info["outputs"] == {
    "score": ["batch", 1],
    "attention": ["batch", 3, 4],
    "attribute_probabilities": ["batch", 67],
  }
  assert info["grid_shape"] == [2, 2] and info["steps"] == 3
  assert info["attribute_ids"] == list(attributes.ATTRIBUTE_IDS[1:])
  assert np.asarray(info["preferences"]).shape == (attributes.NUM_ATTRIBUTES, 1)
  assert info["score"]["pooling"] == "max" and len(info["target_mean"]) == 1
  assert info["platforms"] == ["cpu", "cuda"]
  exported = jax.export.deserialize(
    bytearray((exported_dir / predictor_lib.EXPORT_FUNCTION_FILE).read_bytes())
  )
  batch = exported.in_avals[0].shape[0]
  assert not isinstance(batch, int) and str(batch) == "batch"  # Symbolic: any batch size.
  assert exported.in_avals[0].shape[1:] == (32, 32, 3)


def test_exported_and_in_process_predictions_agree(run, exported_dir, photos):
  images = np.stack(
    [
      predict.load_image(photos / n, image_size=32, max_side=256, max_pixels=None).model_input
      for n in PHOTOS
    ]
  )
  in_process = serving.load_checkpoint_predictor(run, batch_size=8)(images)
  from_artifact = predictor_lib.load_exported_predictor(exported_dir, batch_size=3)
  exported = {
    k: np.concatenate([from_artifact(images[:3])[k], from_artifact(images[3:])[k]])
    for k in in_process
  }
  assert set(exported) == {"score", "attention", "attribute_probabilities"}
  for key in in_process:
    np.testing.assert_allclose(exported[key], in_process[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # The images give different outputs, so the agreement is not that of constants.
  assert np.ptp(in_process["attention"], axis=0).max() > 1e-4
  assert np.ptp(in_process["attribute_probabilities"], axis=0).max() > 1e-4


def test_predict_from_the_artifact_alone(run, exported_dir, photos, tmp_path):
  """run.py with the model code made unimportable and only the artifact's folder: the same records."""
  ratings = tmp_path / "ratings.tsv"
  ratings.write_text("a31_passport\tpassport\t5\na9_face_complete\tface\t3\n")
  out = tmp_path / "from_artifact"
  script = f"""
    import runpy, sys
    for name in ("privattnet_jax.training.train", "privattnet_jax.models", "privattnet_jax.training.checkpoints"):
      sys.modules[name] = None  # import fails
    sys.argv = ["run.py", "--mode=predict", "--exported={exported_dir}", "--output={out}", "--batch_size=2",
                "--preferences={ratings}", "--top_attributes=67", "--images", "{photos}"]
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
  )
  assert result.returncode == 0, result.stderr[-3000:]
  from_artifact = [
    json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()
  ]
  expected = predict.predict(
    serving.load_checkpoint_predictor(run, batch_size=4),
    [str(photos)],
    tmp_path / "ckpt",
    preferences_file=str(ratings),
    top_attributes=67,
    progress=False,
  ).records
  assert len(from_artifact) == len(PHOTOS) and all(r["ok"] for r in from_artifact)
  for a, b in zip(from_artifact, expected):
    assert (a["path"], a["width"], a["height"]) == (b["path"], b["width"], b["height"])
    assert a["score"] == pytest.approx(b["score"], rel=1e-5)
    assert a["user_score"] == pytest.approx(b["user_score"], rel=1e-5)
    probability = {x["id"]: x["probability"] for x in a["top_attributes"]}
    assert len(probability) == 67  # PrivAttNet_MLC: every attribute but a0_safe.
    # The expected max of the two rated attributes (the rest 0): 5 with the passport, else 3 with
    # the face.
    passport, face = probability["a31_passport"], probability["a9_face_complete"]
    assert a["user_score"] == pytest.approx(5 * passport + 3 * face * (1 - passport), rel=1e-5)
    assert [x["id"] for x in a["top_attributes"]] == [x["id"] for x in b["top_attributes"]]
    assert (out / a["heatmap"]).is_file()


def test_artifact_errors(run, exported_dir, tmp_path):
  with pytest.raises(predictor_lib.PredictError, match="does not exist"):
    predictor_lib.load_exported_predictor(tmp_path)
  with pytest.raises(predictor_lib.PredictError, match="platforms must be some of"):
    serving.export_predictor(run, tmp_path / "bad", platforms=("gpu",))
  cuda_only = serving.export_predictor(run, tmp_path / "cuda_only", platforms=("cuda",))
  if jax.default_backend() == "cpu":
    with pytest.raises(
      predictor_lib.PredictError, match=r"exported for \['cuda'\], not for this cpu backend"
    ):
      predictor_lib.load_exported_predictor(cuda_only)
  broken = tmp_path / "broken"
  shutil.copytree(exported_dir, broken)
  info = json.loads((broken / predictor_lib.EXPORT_INFO_FILE).read_text())
  (broken / predictor_lib.EXPORT_INFO_FILE).write_text(
    json.dumps(dict(info, format="something/else"))
  )
  with pytest.raises(predictor_lib.PredictError, match="format"):
    predictor_lib.load_exported_predictor(broken)
