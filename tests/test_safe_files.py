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


@pytest.fixture
def root(tmp_path):
  """A root holding a.txt and links: to a.txt (inside), to a file outside, and a loop."""
  inside = tmp_path / "root"
  (inside / "sub").mkdir(parents=True)
  (inside / "a.txt").write_bytes(b"inside")
  (tmp_path / "secret.txt").write_bytes(b"secret")
  os.symlink(inside / "a.txt", inside / "sub" / "link_in.txt")
  os.symlink(tmp_path / "secret.txt", inside / "link_out.txt")
  os.symlink("loop.txt", inside / "loop.txt")
  return inside


def _reason(path, root) -> str:
  with pytest.raises(safe_files.UnsafeFileError) as error:
    safe_files.read_bytes(path, max_bytes=100, root=root)
  assert isinstance(error.value, OSError)
  assert str(error.value).startswith(f"{error.value.reason}: ") and "\n" not in str(error.value)
  return error.value.reason


def test_paths_stay_inside_the_root_after_following_links(root):
  assert safe_files.read_bytes("a.txt", max_bytes=100, root=root) == b"inside"
  assert safe_files.read_bytes("sub/link_in.txt", max_bytes=100, root=root) == b"inside"
  assert safe_files.read_bytes("sub/../a.txt", max_bytes=100, root=root) == b"inside"
  assert _reason("link_out.txt", root) == "outside_root"
  assert _reason("../secret.txt", root) == "outside_root"
  assert _reason(str(root.parent / "secret.txt"), root) == "outside_root"  # Absolute names too.
  assert _reason("loop.txt", root) == "symlink_loop"
  assert _reason("a.txt\0.jpg", root) == "invalid_path"
  assert _reason(".", root) == "not_a_regular_file"
  assert _reason("none.txt", root) == "missing"
  # Without a root a link is followed anywhere: the caller named the file itself.
  assert safe_files.read_bytes(root / "link_out.txt", max_bytes=100) == b"secret"


def test_a_tilde_is_the_users_home_only_without_a_root(root, monkeypatch):
  monkeypatch.setenv("HOME", str(root))
  assert safe_files.resolve("~/a.txt") == root / "a.txt"
  assert safe_files.resolve("~/a.txt", root) == root / "~" / "a.txt"


def test_printable_escapes_what_a_log_line_cannot_hold():
  assert safe_files.printable("plain/name.jpg") == "plain/name.jpg"
  assert safe_files.printable("a\nb\0c") == "a\\nb\\x00c"
  assert safe_files.printable(b"caf\xff.jpg") == "caf\\udcff.jpg"
  error = safe_files.UnsafeFileError("missing", "bad\nname", "does not exist")
  assert str(error) == "missing: bad\\nname: does not exist" and error.reason == "missing"
