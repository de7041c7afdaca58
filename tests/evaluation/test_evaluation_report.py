"""evaluation_report: the report's folder and images, and the comparison table of several runs."""

import pytest

from privattnet_jax.evaluation import evaluation_report


def test_report_dir_keeps_splits_apart(tmp_path):
  assert evaluation_report.report_dir(tmp_path, "test") == tmp_path
  assert evaluation_report.report_dir(tmp_path, "validation") == tmp_path / "report_validation"


def test_stored_image_checks_the_id():
  source = [{"image_id": b"2017_1", "image": b"x"}]
  assert evaluation_report._stored_image(source, 0, "2017_1") == b"x"  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="holds '2017_1'"):
    evaluation_report._stored_image(source, 0, "2017_2")  # pylint: disable=protected-access
