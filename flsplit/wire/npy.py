"""Tensors to and from Flower ``Array`` payloads (.npy bytes), without numpy's per-call parsing.

Flower's ``Array(tensor)`` writes the tensor with ``np.save`` and ``Array.numpy()`` reads it
back with ``np.load``: every call formats or parses the .npy header (``ast.literal_eval`` on
the read side) and copies the payload through a ``BytesIO``. On the step path (smashed data up,
gradients down, a few hundred KB each) that costs more than the copy itself.

``array_of`` and ``tensor_of`` produce and accept exactly the same bytes:

* ``array_of(t)`` writes the header ``np.save`` writes for ``t``'s dtype and shape (taken once
  per dtype and shape from ``np.save`` itself), then the payload; one copy. A tensor that
  is not C-contiguous goes through Flower's own path (``np.save`` would write it in Fortran
  order or through a copy of its own).
* ``tensor_of(a)`` looks the array's header up by its exact bytes (the first time, numpy's
  own header reader parses it, under its limits), checks that the payload holds the values
  the header announces, and copies them once into a new (writable) tensor. Anything else (not
  ``numpy.ndarray`` serialization, no .npy magic, a header numpy refuses or that is not a plain
  C-order array of a dtype torch holds, a short payload) goes through ``Array.numpy()``
  unchanged, so a malformed payload fails with numpy's own error, as before.

Every byte is still untrusted: the cache only remembers what numpy's reader made of a header,
and a header it has not seen is parsed by that reader.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from flwr.app import Array

__all__ = ["array_of", "tensor_of"]

_NUMPY = "numpy.ndarray"  # flwr's SType.NUMPY
_MAGIC = b"\x93NUMPY"
_MAX_CACHED = 1024  # distinct headers remembered (shapes of one run; a flood of new ones is parsed each time)
_MAX_CACHED_HEADER = 512  # bytes; .npy headers are 128 for most shapes: longer ones are parsed each time

# numpy dtypes whose values torch holds as they are (native byte order only)
_TORCH_DTYPES = {
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}

# exact header bytes (magic to the end of the header) -> (numpy dtype, shape, count), or None:
# not a header this fast path takes (numpy's own reader decides about it every time)
_READ: dict[bytes, Optional[tuple[np.dtype, tuple[int, ...], int]]] = {}
# (dtype.str, shape) -> the header np.save writes for a C-order array of them
_WRITE: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _header_end(data: bytes) -> Optional[int]:
    """Where the .npy header of ``data`` ends (versions 1.0 and 2.0), or ``None``."""
    if len(data) < 10 or data[:6] != _MAGIC or data[7] != 0:
        return None
    if data[6] == 1:
        return 10 + (data[8] | data[9] << 8)
    if data[6] == 2 and len(data) >= 12:
        return 12 + int.from_bytes(data[8:12], "little")
    return None


def _learn(header: bytes) -> Optional[tuple[np.dtype, tuple[int, ...], int]]:
    """numpy's reading of a header (its own reader and checks), if it is one this path takes."""
    try:
        fp = io.BytesIO(header)
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(fp)
    except Exception:  # noqa: BLE001  (numpy's path raises its own error for it)
        return None
    if fp.tell() != len(header) or fortran_order or dtype.hasobject or not dtype.isnative:
        return None
    if dtype not in _TORCH_DTYPES or any(d < 0 for d in shape):
        return None
    return dtype, tuple(shape), int(np.prod(shape, dtype=np.int64)) if shape else 1


def tensor_of(array: Array) -> torch.Tensor:
    """The array's values as a new CPU tensor (see the module docstring); whatever numpy's
    ``np.load`` refuses raises its error (through ``Array.numpy()``)."""
    data = array.data
    if array.stype == _NUMPY and isinstance(data, bytes):
        end = _header_end(data)
        if end is not None and end <= len(data):
            header = data[:end]
            if header in _READ:
                spec = _READ[header]
            else:
                spec = _learn(header)
                if len(_READ) < _MAX_CACHED and len(header) <= _MAX_CACHED_HEADER:  # at most 512 KB of keys
                    _READ[header] = spec
            if spec is not None:
                dtype, shape, count = spec
                if len(data) - end >= count * dtype.itemsize:  # np.load ignores bytes past the values, as here
                    values = np.frombuffer(data, dtype=dtype, count=count, offset=end) if count else np.empty(0, dtype)
                    return torch.from_numpy(values.reshape(shape).copy())
    return torch.from_numpy(array.numpy())


def _write_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    key = (dtype.str, shape)
    header = _WRITE.get(key)
    if header is None:
        like = np.empty(shape, dtype)
        buffer = io.BytesIO()
        np.save(buffer, like, allow_pickle=False)
        written = buffer.getvalue()
        header = written[: len(written) - like.nbytes]
        if len(_WRITE) < _MAX_CACHED:
            _WRITE[key] = header
    return header


def array_of(tensor: torch.Tensor) -> Array:
    """``Array(tensor)`` with the same fields and bytes, written without ``np.save`` per call."""
    values = tensor.detach().cpu().numpy()
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array(values)
    shape = tuple(int(d) for d in values.shape)
    data = b"".join((_write_header(values.dtype, shape), values.reshape(-1).view(np.uint8) if values.size else b""))
    return Array(dtype=str(values.dtype), shape=shape, stype=_NUMPY, data=data)
