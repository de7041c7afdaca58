"""Where two nested dicts (configs, manifests) differ, as dotted paths; a leaf any layer imports."""

from __future__ import annotations

from typing import Any


def nested_differences(a: Any, b: Any, prefix: str = "", missing: Any = None) -> list[tuple]:
  """(dotted path, a's value, b's value) of each leaf that differs, in sorted key order.

  Dicts are compared key by key, a key only one side has standing as `missing` on the other;
  anything else (lists included) is compared whole.
  """
  if isinstance(a, dict) and isinstance(b, dict):
    return [
      difference
      for key in sorted(set(a) | set(b))
      for difference in nested_differences(
        a.get(key, missing), b.get(key, missing), f"{prefix}.{key}" if prefix else key, missing
      )
    ]
  return [] if a == b else [(prefix, a, b)]
