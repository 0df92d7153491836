"""Packing Node outputs for Redis: msgpack with numpy arrays as an extension type.

Only plain data crosses stages (numbers, strings, bytes, lists, dicts and
numpy arrays); nothing is pickled, so a Redis key written by one version of a
worker is safe to read in another process.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

__all__ = ["pack_value", "unpack_value"]

_NDARRAY = 1


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("a Node output cannot hold an object-dtype array; use a numeric dtype or a list")
        arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
        header = msgpack.packb([arr.dtype.str, list(obj.shape)])
        return msgpack.ExtType(_NDARRAY, header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(
        f"a Node output cannot hold {type(obj).__name__}; use numbers, strings, bytes, lists, dicts, arrays"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _NDARRAY:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        dtype, shape = next(unpacker)
        offset = unpacker.tell()
        return np.frombuffer(data, dtype=np.dtype(dtype), offset=offset).reshape(shape)
    return msgpack.ExtType(code, data)


def pack_value(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)


def unpack_value(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
