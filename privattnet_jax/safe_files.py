"""Reading files named by untrusted input: contained in a root, regular files only, bounded.

Annotations, split lists and predict's arguments name files; a careless or hostile name must
not reach outside the dataset (`../secret.jpg`, `/etc/passwd`, a symlink out of the root), hang
the process (a FIFO blocks its reader until a writer comes) or exhaust memory (`/dev/zero`, a
huge file). Every such read goes through `read_bytes` here:

- a path is resolved (symlinks followed) and, given a root, must lie inside the resolved root;
- only regular files are read: `os.stat` decides before anything is opened, and the file is
  then opened non-blocking and checked again on the open descriptor (no race with a swap);
- a read stops at `max_bytes`;
- a symlink loop is an error like the others, not a crash.

Failures raise `UnsafeFileError` with a `reason` (one of `REASONS`), which callers turn into a
per-item report entry or a skip.
"""

from __future__ import annotations

import errno
import os
import pathlib
import stat

REASONS: dict[str, str] = {
  "outside_root": "the path resolves (after following symlinks) outside the folder it must stay in",
  "not_a_regular_file": "a FIFO, device, socket or folder: never opened for reading",
  "file_too_large": "larger than the read limit",
  "symlink_loop": "the path's symlinks form a loop",
  "missing": "no such file",
  "unreadable": "the file exists but cannot be read (permissions, I/O error)",
  "invalid_path": "not a usable path (a NUL byte, characters the file system cannot encode)",
}
MAX_ANNOTATION_BYTES = 4 * 2**20  # VISPR's annotation JSONs are ~1 KB.
MAX_LIST_BYTES = 64 * 2**20  # A split list: one short path per line.
MAX_IMAGE_BYTES = (
  512 * 2**20
)  # Above any camera JPEG/PNG; a bound for hostile files, not for photos.


def printable(path) -> str:
  """`path` as text every log, terminal and UTF-8 file takes.

  A name's undecodable bytes (lone surrogates), NULs and control characters are written as escapes
  instead of breaking the writer.
  """
  text = os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class UnsafeFileError(OSError):
  """One file cannot be read safely; `reason` names why (see REASONS)."""

  def __init__(self, reason: str, path, message: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {printable(path)}: {message}")
    self.reason = reason
    self.path = path
    self.message = message


def resolve(path: str | os.PathLike, root: str | os.PathLike | None = None) -> pathlib.Path:
  """`path` (relative to `root` when given, absolute paths included) with every symlink followed.

  Raises UnsafeFileError: `symlink_loop`, or `outside_root` when the result is not inside the
  resolved root. The file need not exist.
  """
  base = pathlib.Path(os.path.realpath(root)) if root is not None else None
  if base is None:
    candidate = pathlib.Path(os.path.expanduser(os.fspath(path)))  # The user's own names only.
  else:
    candidate = base / os.fspath(
      path
    )  # An absolute `path` replaces the root; the check below catches it.
  try:
    resolved = candidate.resolve(strict=False)
    os.fspath(resolved).encode(errors="strict")  # Lone surrogates from JSON cannot name a file.
    if "\0" in os.fspath(resolved):
      raise ValueError("embedded null byte")
  except ValueError as e:
    raise UnsafeFileError("invalid_path", repr(os.fspath(path)), str(e)) from None
  except RuntimeError:  # Python < 3.13: "Symlink loop from ...".
    raise UnsafeFileError("symlink_loop", path, "its symlinks form a loop") from None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UnsafeFileError("symlink_loop", path, "its symlinks form a loop") from None
    raise UnsafeFileError("unreadable", path, e.strerror or str(e)) from None
  if base is not None and resolved != base and base not in resolved.parents:
    raise UnsafeFileError(
      "outside_root", path, f"resolves to {printable(resolved)}, outside {base}"
    )
  return resolved


def regular_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> pathlib.Path:
  """The resolved path of an existing regular file (inside `root` when given), opened by no one.

  Raises UnsafeFileError (`missing`, `not_a_regular_file`, `symlink_loop`, `outside_root`).
  """
  resolved = resolve(path, root)
  try:
    info = os.stat(resolved)
  except ValueError as e:
    raise UnsafeFileError("invalid_path", repr(os.fspath(path)), str(e)) from None
  except FileNotFoundError:
    raise UnsafeFileError("missing", path, "does not exist") from None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UnsafeFileError("symlink_loop", path, "its symlinks form a loop") from None
    raise UnsafeFileError("unreadable", path, e.strerror or str(e)) from None
  if not stat.S_ISREG(info.st_mode):
    raise UnsafeFileError(
      "not_a_regular_file", path, f"is a {_kind(info.st_mode)}, not a regular file"
    )
  return resolved


def read_bytes(
  path: str | os.PathLike, *, max_bytes: int, root: str | os.PathLike | None = None
) -> bytes:
  """The contents of a regular file inside `root` (when given), at most `max_bytes` long.

  Raises UnsafeFileError for anything else (see REASONS); never blocks on a FIFO or device.
  """
  resolved = regular_file(path, root)
  flags = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
  )
  try:
    fd = os.open(resolved, flags)
  except FileNotFoundError:
    raise UnsafeFileError("missing", path, "does not exist") from None
  except OSError as e:  # ELOOP here: the last component became a symlink after it was resolved.
    raise UnsafeFileError("unreadable", path, e.strerror or str(e)) from None
  with os.fdopen(fd, "rb") as file:
    info = os.fstat(file.fileno())
    if not stat.S_ISREG(info.st_mode):  # Swapped between the stat and the open.
      raise UnsafeFileError(
        "not_a_regular_file", path, f"is a {_kind(info.st_mode)}, not a regular file"
      )
    if info.st_size > max_bytes:
      raise UnsafeFileError(
        "file_too_large", path, f"{info.st_size} bytes > the limit of {max_bytes}"
      )
    try:
      data = file.read(max_bytes + 1)
    except OSError as e:
      raise UnsafeFileError("unreadable", path, e.strerror or str(e)) from None
  if len(data) > max_bytes:  # Grew while being read.
    raise UnsafeFileError("file_too_large", path, f"more than the limit of {max_bytes} bytes")
  return data


def _kind(mode: int) -> str:
  for test, name in (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
  ):
    if test(mode):
      return name
  return "special file"
