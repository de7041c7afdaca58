"""safe_files: reads contained in a root, of regular files only, bounded in size, never blocking."""

import os

import pytest

from privattnet_jax import safe_files


def test_safe_reads_refuse_without_opening(no_hang, tmp_path):
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  for path, reason in (
    (fifo, "not_a_regular_file"),
    ("/dev/zero", "not_a_regular_file"),
    (tmp_path, "not_a_regular_file"),
    (tmp_path / "none", "missing"),
  ):
    with pytest.raises(safe_files.UnsafeFileError) as error:
      safe_files.read_bytes(path, max_bytes=10)
    assert error.value.reason == reason
  big = tmp_path / "big.bin"
  big.write_bytes(b"x" * 11)
  with pytest.raises(safe_files.UnsafeFileError, match="file_too_large"):
    safe_files.read_bytes(big, max_bytes=10)
  assert safe_files.read_bytes(big, max_bytes=11) == b"x" * 11
  with pytest.raises(safe_files.UnsafeFileError, match="outside_root"):
    safe_files.read_bytes("../big.bin", max_bytes=100, root=tmp_path / "sub")
