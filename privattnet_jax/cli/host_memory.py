"""Host memory: keep what XLA:CPU frees for its next step instead of handing it back to the OS.

XLA:CPU allocates each execution's temporary buffers anew with malloc, from several threads. glibc
serves blocks that large with fresh mmap'd pages, or trims them off its per-thread heaps when they
are freed, so every train step page-faults its whole working set again, a large share of a small
step's time (docs/benchmarks.md, "Page faults: every step mapped its working set anew"; about 20% of
a head step from cached features on the 2-core CPU). One malloc arena that never maps, nor trims,
large blocks keeps the pages and reuses them: the process stays at its peak resident memory, as it
would under tcmalloc or jemalloc. Linux with glibc only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = (
  (_M_ARENA_MAX, 1),  # XLA's worker threads allocate from the main heap, not their own.
  (_M_MMAP_MAX, 0),  # Large blocks come from the heap, not from fresh mappings.
  (_M_TRIM_THRESHOLD, 2**31 - 1),  # Freed memory stays with the process (mallopt takes an int).
)


def keep_freed_memory() -> bool:
  """Sets glibc's malloc as above; True where it applied.

  Call it before the first large allocation: run.py does, first thing, and so do the benchmarks.
  """
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # Not glibc (macOS, musl): its allocator stays as it is.
    return False
  return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
