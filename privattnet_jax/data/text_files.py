"""Reading the text files users hand in: split lists, preference TSVs, user tables.

Editors on other systems save them with a byte-order mark (Notepad, Excel's "UTF-8 CSV"), CRLF or
CR line ends, in UTF-16, or with trailing spaces. Read naively, a BOM sticks to the first entry,
which then names no file and is lost. Every such file is read here, once, the same way:

- read through `safe_files` (regular files only, size-bounded, never blocks on a FIFO);
- a UTF-8 BOM is dropped, a UTF-16 BOM selects UTF-16; other bytes are UTF-8, undecodable bytes
  replaced (they then show in the entry that names no file, never stop the read);
- lines end at LF, CRLF or CR; a BOM left at the start of a line (files concatenated) is dropped.
"""

from __future__ import annotations

import codecs
import os

from privattnet_jax import safe_files

BOM = "\ufeff"


def decode(data: bytes) -> str:
  """A text file's bytes -> text, without its byte-order mark."""
  if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
    return data.decode("utf-16", errors="replace")
  return data.decode("utf-8-sig", errors="replace")


def lines(text: str) -> list[str]:
  """The lines of decoded text, without line ends and without a BOM at their start."""
  return [line.removeprefix(BOM) for line in text.splitlines()]


def read_lines(
  path: str | os.PathLike, *, max_bytes: int = safe_files.MAX_LIST_BYTES, root=None
) -> list[str]:
  """The lines of a text file (see the module docstring); raises safe_files.UnsafeFileError."""
  return lines(decode(safe_files.read_bytes(path, max_bytes=max_bytes, root=root)))


def entries(path: str | os.PathLike, *, max_bytes: int = safe_files.MAX_LIST_BYTES) -> list[str]:
  """The non-blank lines of a list file, with surrounding whitespace removed (split lists)."""
  return [line.strip() for line in read_lines(path, max_bytes=max_bytes) if line.strip()]
