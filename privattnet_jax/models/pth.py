"""PyTorch `.pth` state dicts read without torch, and without running anything from the pickle.

torch saves a state dict in one of two layouts:
- zip (torch >= 1.6): `<name>/data.pkl`, a pickle whose tensors refer by key to raw storages
  `<name>/data/<key>`, plus `<name>/byteorder`;
- legacy (older torch; e.g. the efficientnet-lite0 file on PyPI): a stream of pickles, the magic
  number, the protocol version, the system info, the object, the list of storage keys, then
  each storage as an int64 element count followed by its raw bytes.

The object pickle is read by a restricted unpickler that knows exactly the globals a state dict
of tensors needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and
`_rebuild_parameter`, the typed storages such as `torch.FloatStorage`) and rebuilds each tensor
as a numpy array from its storage, offset, shape and strides. Any other global is refused before
it could be called, so a malicious pickle never runs: this is what `torch.load(weights_only=True)`
does, without torch.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class PthError(ValueError):
  """A file that is not a plain torch state dict of tensors; the message says why, in one line."""


class _StorageType:
  """A typed-storage global (`torch.FloatStorage`): only its element type is used."""

  __slots__ = ("dtype",)

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _Storage:
  __slots__ = ("dtype", "key", "numel")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
  """A tensor before its storage bytes are read: (storage, offset, shape, strides) in elements."""

  __slots__ = ("offset", "shape", "storage", "strides")

  def __init__(self, storage, offset, shape, strides):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError("a tensor whose storage is not a storage reference")
    self.storage, self.offset = storage, int(offset)
    self.shape, self.strides = tuple(shape), tuple(strides)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  del requires_grad, backward_hooks, metadata  # Autograd state: not part of the values.
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds a state dict of tensors; refuses every global it does not know."""

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"it refers to {module}.{name}")

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: (..., numel, view_metadata).
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:60]}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
      raise pickle.UnpicklingError(f"malformed storage reference {str(pid)[:60]}")
    if len(pid) == 6 and pid[5] is not None:
      raise pickle.UnpicklingError("storage views (torch < 0.4) are not supported")
    return _Storage(key, storage_type.dtype, numel)


def _load_object(file: BinaryIO) -> Any:
  try:
    return _RestrictedUnpickler(file).load()
  except pickle.UnpicklingError as e:
    raise PthError(
      f"refused: not a plain state dict of tensors ({e}); this reader never runs code from a pickle"
    ) from None
  except Exception as e:  # Truncated or foreign bytes raise many types.
    raise PthError(f"corrupt pickle: {type(e).__name__}: {e}") from None


def _tensor_refs(obj: Any) -> list[_TensorRef]:
  if isinstance(obj, _TensorRef):
    return [obj]
  if isinstance(obj, Mapping):
    return [ref for value in obj.values() for ref in _tensor_refs(value)]
  if isinstance(obj, (list, tuple)):
    return [ref for value in obj for ref in _tensor_refs(value)]
  return []


def _materialise(obj: Any, storages: Mapping[str, np.ndarray]) -> Any:
  """The object with every tensor reference replaced by a numpy array (a copy)."""
  if isinstance(obj, _TensorRef):
    flat = storages[obj.storage.key]
    if any(s < 0 for s in obj.strides) or any(d < 0 for d in obj.shape):
      raise PthError("a tensor with negative strides or shape")
    span = sum((d - 1) * s for d, s in zip(obj.shape, obj.strides)) if all(obj.shape) else -1
    if obj.offset < 0 or obj.offset + span >= flat.size:
      raise PthError(
        f"a tensor of shape {obj.shape} reaches past its storage of {flat.size} elements"
      )
    if not all(obj.shape):
      return np.zeros(obj.shape, flat.dtype)
    itemsize = flat.dtype.itemsize
    strides = [s * itemsize for s in obj.strides]
    view = np.lib.stride_tricks.as_strided(flat[obj.offset :], obj.shape, strides, writeable=False)
    return np.array(view)
  if isinstance(obj, Mapping):
    materialised = {key: _materialise(value, storages) for key, value in obj.items()}
    if isinstance(obj, collections.OrderedDict):
      return collections.OrderedDict(materialised)
    return materialised
  if isinstance(obj, list):
    return [_materialise(value, storages) for value in obj]
  if isinstance(obj, tuple):
    return tuple(_materialise(value, storages) for value in obj)
  return obj


def _storage_array(data: bytes, storage: _Storage) -> np.ndarray:
  expected = storage.numel * storage.dtype.itemsize
  if len(data) < expected:
    raise PthError(f"storage {storage.key} is truncated ({len(data)} of {expected} bytes)")
  return np.frombuffer(data, storage.dtype, count=storage.numel)


def _read_zip(path: pathlib.Path) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [name for name in names if name.endswith("data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
      raise PthError("a zip archive without one <name>/data.pkl: not a torch.save file")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
      raise PthError("big-endian tensors are not supported")
    with archive.open(pickles[0]) as file:
      obj = _load_object(file)
    storages = {}
    for ref in _tensor_refs(obj):
      storage = ref.storage
      if storage.key not in storages:
        try:
          data = archive.read(f"{prefix}data/{storage.key}")
        except KeyError:
          raise PthError(f"storage {storage.key} is missing from the archive") from None
        storages[storage.key] = _storage_array(data, storage)
  return _materialise(obj, storages)


def _read_legacy(file: BinaryIO) -> Any:
  def header_pickle():
    try:
      return _plain_value(file)
    except Exception as e:  # Foreign bytes.
      raise PthError(f"not a torch.save file ({type(e).__name__})") from None

  if header_pickle() != LEGACY_MAGIC:
    raise PthError("neither a zip archive nor torch's legacy format: not a torch.save file")
  if header_pickle() != LEGACY_PROTOCOL:
    raise PthError("an unsupported torch legacy protocol version")
  info = header_pickle()
  if not isinstance(info, dict) or not info.get("little_endian", False):
    raise PthError("big-endian tensors are not supported")
  obj = _load_object(file)
  keys = header_pickle()
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise PthError("corrupt storage key list")
  by_key = {}
  for ref in _tensor_refs(obj):
    by_key.setdefault(ref.storage.key, ref.storage)
  storages = {}
  for key in keys:
    count_bytes = file.read(8)
    if len(count_bytes) != 8:
      raise PthError(f"storage {key} is truncated")
    (numel,) = struct.unpack("<q", count_bytes)
    storage = by_key.get(key)
    itemsize = storage.dtype.itemsize if storage is not None else 0
    if storage is None or numel != storage.numel:
      raise PthError(f"storage {key} does not match the tensors that use it")
    storages[key] = _storage_array(file.read(numel * itemsize), storage)
  missing = set(by_key) - set(storages)
  if missing:
    raise PthError(f"storages {sorted(missing)[:5]} are missing from the file")
  return _materialise(obj, storages)


class _NoGlobalsUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def _plain_value(file: BinaryIO) -> Any:
  """A header pickle of plain values (ints, dicts, lists of str): no globals at all."""
  return _NoGlobalsUnpickler(file).load()


def load(path: str | pathlib.Path) -> Any:
  """The object a `.pth` file holds, its tensors as numpy arrays; raises PthError otherwise."""
  path = pathlib.Path(path)
  if zipfile.is_zipfile(path):
    try:
      return _read_zip(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise PthError(f"corrupt zip archive: {e}") from None
  with open(path, "rb") as file:
    return _read_legacy(file)
