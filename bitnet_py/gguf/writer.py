"""Streaming GGUF v3 writer.

Usage (three phases, in order):
    w = GGUFWriter(path)                      # alignment 32 unless told otherwise
    w.add("general.architecture", "bitnet")   # metadata; types inferred or given (see `add`)
    w.add_tensor_info("blk.0.attn_q.weight", (M, K), GGMLType.I2_S)   # numpy shape, outermost first
    w.write_header()                          # header + metadata + tensor table + padding
    w.write_tensor("blk.0.attn_q.weight", region)   # data in declared order, one tensor at a time
    w.close()                                 # checks every declared tensor was written

Only one tensor's data is ever in memory: offsets come from the declared shapes and types (sizes as llama.cpp
computes them, including the 32-byte I2_S/TL2 tails), so data can be produced lazily and written straight out.
Type inference: bool -> BOOL, int -> UINT32 (INT32 if negative, UINT64/INT64 when it does not fit), float -> FLOAT32,
str -> STRING, list/tuple of str -> ARRAY[STRING], numpy arrays by dtype (float64 stays FLOAT64), lists of ints ->
ARRAY[INT32], lists of floats -> ARRAY[FLOAT32]. These are the types bitnet.cpp's files use.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_SCALAR_DTYPES, GGUFValueType, Keys
from .reader import tensor_nbytes, type_name
from .string_array import StringArray

log = logging.getLogger(__name__)
GGUF_WRITE_VERSION = 3
_NP_TO_VTYPE = {np.dtype(v).newbyteorder("<"): k for k, v in GGUF_SCALAR_DTYPES.items() if k != GGUFValueType.BOOL}
_NP_TO_VTYPE[np.dtype(bool)] = GGUFValueType.BOOL


class GGUFWriteError(ValueError):
    """Invalid use of the writer or data that does not match the declared tensor."""


def _u32(v: int) -> bytes:
    return int(v).to_bytes(4, "little")


def _u64(v: int) -> bytes:
    return int(v).to_bytes(8, "little")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return _u64(len(b)) + b


def _infer_scalar(v: Any) -> int:
    if isinstance(v, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(v, (int, np.integer)):
        v = int(v)
        if 0 <= v < 1 << 32:
            return GGUFValueType.UINT32
        if -(1 << 31) <= v < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if v > 0 else GGUFValueType.INT64
    if isinstance(v, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(v, str):
        return GGUFValueType.STRING
    if isinstance(v, (list, tuple, np.ndarray, StringArray)):
        return GGUFValueType.ARRAY
    raise GGUFWriteError(f"cannot store a {type(v).__name__} in GGUF metadata")


def _encode_scalar(v: Any, vtype: int) -> bytes:
    if vtype == GGUFValueType.STRING:
        if not isinstance(v, str):
            raise GGUFWriteError(f"expected a string, got {type(v).__name__}")
        return _string(v)
    if vtype not in GGUF_SCALAR_DTYPES:
        raise GGUFWriteError(f"unknown GGUF value type {vtype}")
    try:
        return np.array([v], dtype=GGUF_SCALAR_DTYPES[vtype]).tobytes()
    except (OverflowError, ValueError, TypeError) as e:
        raise GGUFWriteError(f"value {v!r} does not fit type {GGUFValueType(vtype).name}: {e}") from None


def encode_value(value: Any, vtype: int | None = None, etype: int | None = None) -> bytes:
    """Type id + payload of one metadata value. For arrays, `vtype` = ARRAY and `etype` the element type."""
    vtype = _infer_scalar(value) if vtype is None else int(vtype)
    if vtype != GGUFValueType.ARRAY:
        return _u32(vtype) + _encode_scalar(value, vtype)
    if isinstance(value, np.ndarray):
        arr = value.reshape(-1)
        if etype is None:
            key = np.dtype(arr.dtype).newbyteorder("<") if arr.dtype != bool else np.dtype(bool)
            if key not in _NP_TO_VTYPE:
                raise GGUFWriteError(f"no GGUF array type for numpy dtype {arr.dtype}")
            etype = _NP_TO_VTYPE[key]
        payload = np.ascontiguousarray(arr, dtype=GGUF_SCALAR_DTYPES[etype]).tobytes()
        return _u32(vtype) + _u32(etype) + _u64(arr.size) + payload
    items = list(value)
    if etype is None:
        if all(isinstance(x, str) for x in items):  # an empty list is stored as a string array
            etype = GGUFValueType.STRING
        elif all(isinstance(x, (bool, np.bool_)) for x in items):
            etype = GGUFValueType.BOOL
        elif all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
            etype = GGUFValueType.INT32
        elif all(isinstance(x, (int, float, np.integer, np.floating)) for x in items):
            etype = GGUFValueType.FLOAT32
        elif all(isinstance(x, (list, tuple, np.ndarray)) for x in items):
            etype = GGUFValueType.ARRAY
        else:
            raise GGUFWriteError("array elements of mixed types")
    head = _u32(vtype) + _u32(etype) + _u64(len(items))
    if etype == GGUFValueType.STRING:
        return head + b"".join(_string(x) for x in items)
    if etype == GGUFValueType.ARRAY:
        return head + b"".join(encode_value(x, GGUFValueType.ARRAY)[4:] for x in items)
    return head + np.array(items, dtype=GGUF_SCALAR_DTYPES[etype]).tobytes()


def counted_parts(parts, bar):
    """Pass tensor parts through, advancing a tqdm progress bar (or None) by each part's bytes."""
    for p in parts:
        if bar is not None:
            bar.update(p.nbytes)
        yield p


class GGUFWriter:
    def __init__(self, path: str | os.PathLike, alignment: int = GGUF_DEFAULT_ALIGNMENT):
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFWriteError(f"alignment must be a power of two, got {alignment}")
        self.path = os.fspath(path)
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: list[tuple[str, tuple[int, ...], int, int, int]] = []  # name, ggml shape, type, off, nbytes
        self._names: set[str] = set()
        self._next_offset = 0
        self._written = 0
        self._state = "meta"
        self._file = None
        if alignment != GGUF_DEFAULT_ALIGNMENT:
            self.add(Keys.ALIGNMENT, alignment)

    # ---- metadata ------------------------------------------------------------------------------------
    def add(self, key: str, value: Any, vtype: int | None = None, etype: int | None = None) -> None:
        """Add one metadata entry (later adds of the same key replace the value, keeping its position)."""
        if self._state != "meta":
            raise GGUFWriteError(f"metadata {key!r} added after the header was written")
        if not isinstance(key, str) or not key:
            raise GGUFWriteError(f"bad metadata key {key!r}")
        self._kv[key] = encode_value(value, vtype, etype)

    def add_many(self, items: dict[str, Any]) -> None:
        for k, v in items.items():
            self.add(k, v)

    # ---- tensors -------------------------------------------------------------------------------------
    def add_tensor_info(self, name: str, shape: tuple[int, ...], type_id: int) -> int:
        """Declare a tensor; `shape` in numpy order (outermost first, e.g. (M, K)). Returns its data size."""
        if self._state != "meta":
            raise GGUFWriteError(f"tensor {name!r} declared after the header was written")
        if name in self._names:
            raise GGUFWriteError(f"duplicate tensor {name!r}")
        if not 1 <= len(shape) <= 4 or any(int(d) <= 0 for d in shape):
            raise GGUFWriteError(f"tensor {name!r}: bad shape {shape}")
        ggml_shape = tuple(int(d) for d in reversed(shape))
        nbytes = tensor_nbytes(int(type_id), ggml_shape)
        self._tensors.append((name, ggml_shape, int(type_id), self._next_offset, nbytes))
        self._names.add(name)
        self._next_offset += (nbytes + self.alignment - 1) // self.alignment * self.alignment
        return nbytes

    def write_header(self) -> None:
        if self._state != "meta":
            raise GGUFWriteError("header already written")
        self._file = open(self.path, "wb")
        f = self._file
        f.write(GGUF_MAGIC + _u32(GGUF_WRITE_VERSION) + _u64(len(self._tensors)) + _u64(len(self._kv)))
        for key, payload in self._kv.items():
            f.write(_string(key) + payload)
        for name, shape, type_id, off, _ in self._tensors:
            f.write(_string(name) + _u32(len(shape)) + b"".join(_u64(d) for d in shape) + _u32(type_id) + _u64(off))
        self._pad(f.tell())
        self._state = "data"

    def _pad(self, pos: int) -> None:
        n = -pos % self.alignment
        if n:
            self._file.write(b"\0" * n)

    def write_tensor(self, name: str, data: np.ndarray | bytes | bytearray | memoryview) -> None:
        """Write the next declared tensor's data region (exactly its size in bytes)."""
        buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if self._state == "data" and self._written < len(self._tensors):
            exp_name, _, type_id, _, nbytes = self._tensors[self._written]
            if name == exp_name and buf.nbytes != nbytes:  # refuse before writing anything
                raise GGUFWriteError(f"tensor {name!r} ({type_name(type_id)}): {buf.nbytes} bytes given, "
                                     f"{nbytes} declared")
        self.write_tensor_parts(name, [buf])

    def write_tensor_parts(self, name: str, parts) -> None:
        """Write the next declared tensor's data region from an iterable of consecutive pieces (arrays or
        bytes), so that a large tensor never has to be in memory at once."""
        if self._state == "meta":
            self.write_header()
        if self._state != "data":
            raise GGUFWriteError("writer is closed")
        if self._written >= len(self._tensors):
            raise GGUFWriteError(f"tensor {name!r} was not declared")
        exp_name, _, type_id, _, nbytes = self._tensors[self._written]
        if name != exp_name:
            raise GGUFWriteError(f"tensors must be written in declared order: expected {exp_name!r}, got {name!r}")
        given = 0
        for data in parts:
            buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
            given += buf.nbytes
            if given > nbytes:
                break
            self._file.write(buf)
        if given != nbytes:
            self._state = "failed"
            raise GGUFWriteError(f"tensor {name!r} ({type_name(type_id)}): {given}{'+' if given > nbytes else ''} "
                                 f"bytes given, {nbytes} declared")
        self._written += 1
        self._pad(nbytes)

    def close(self) -> None:
        """Finish the file. Raises if declared tensors were never written (the file is then incomplete)."""
        if self._state == "meta":
            self.write_header()
        if self._state == "closed":
            return
        if self._state == "failed":
            self.abort()
            raise GGUFWriteError(f"{self.path}: a tensor was written with the wrong size; file removed")
        self._file.close()
        self._state = "closed"
        if self._written != len(self._tensors):
            missing = [t[0] for t in self._tensors[self._written:]]
            raise GGUFWriteError(f"{self.path}: {len(missing)} declared tensors never written (first: {missing[0]})")

    def abort(self) -> None:
        """Close and delete a partial file (after an error)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._state = "closed"
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "GGUFWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
