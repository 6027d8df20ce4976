"""GGUF reader: memory-maps the file, parses metadata and tensor infos, hands out zero-copy views.

Reads what bitnet.cpp writes (I2_S = 36, TL2 = 39, which the `gguf` package cannot parse) as well as
upstream types. Every size and offset is checked against the file before anything is mapped, so a
truncated or lying file fails here with a GGUFError, never later with a crash or a huge allocation.
Long string arrays (vocabulary, merges) are validated at open but decoded only on access (`StringArray`).
"""
from __future__ import annotations

import logging
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import (GGML_BLOCK_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_SCALAR_DTYPES,
                        GGUF_SUPPORTED_VERSIONS, I2S_TAIL_BYTES, TL2_TAIL_BYTES, GGMLType,
                        GGUFValueType, Keys)
from ..huge_pages import copy_to_anonymous, fits_in_memory, release
from ..promotion import Promotion, promote
from .string_array import StringArray, scan_string_array

log = logging.getLogger(__name__)

MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_DIMS = 4
MAX_STRING = 1 << 28
MAX_ELEMENTS = 1 << 40
# String arrays with at least this many elements (the vocabulary and merges of real models) stay in the map as
# a StringArray, decoded on access; shorter ones become lists.
LAZY_STRING_ARRAY_MIN = 4096


class GGUFError(ValueError):
    """The file is not a GGUF file we can read; the message says why."""


def type_name(type_id: int) -> str:
    try:
        return GGMLType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


def tensor_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor's data region as llama.cpp computes it; shape is ggml order (ne0 first)."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if type_id == GGMLType.I2_S:
        if n % 4:
            raise GGUFError(f"I2_S tensor with {n} elements (not a multiple of 4)")
        return n // 4 + I2S_TAIL_BYTES
    if type_id == GGMLType.TL2:
        k = shape[0]
        m = n // k
        nb = (k - 256) * m // 3 * 5 // 8 + 256 * m // 2 * 4 // 8
        nb = (nb + 31) // 32 * 32
        return nb + TL2_TAIL_BYTES
    if type_id not in GGML_BLOCK_SIZES:
        raise GGUFError(f"unsupported tensor type {type_name(type_id)}")
    block, size = GGML_BLOCK_SIZES[type_id]
    if shape[0] % block:
        raise GGUFError(f"{type_name(type_id)} row of {shape[0]} values is not a multiple of {block}")
    return n // block * size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] = ne0 = row length (K)
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def np_shape(self) -> tuple[int, ...]:
        """Row-major numpy shape (outermost first): [M, K] for a 2-D weight."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf: memoryview, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"file truncated while reading {what} at byte {self.pos}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, dtype: str, what: str):
        n = np.dtype(dtype).itemsize
        start = self.take(n, what)
        return np.frombuffer(self.buf, dtype=dtype, count=1, offset=start)[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("<u4", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<u8", what))

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > MAX_STRING:
            raise GGUFError(f"absurd string length {n} in {what}")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def string_array(self, count: int, what: str) -> list[str] | StringArray:
        """count strings (u64 length + UTF-8 bytes each), every length checked against the file; long arrays
        come back as a StringArray over the map, short ones as a list."""
        try:
            starts = scan_string_array(self.buf, self.pos, count, self.size, MAX_STRING)
        except ValueError as e:
            raise GGUFError(f"{e} while reading {what}") from None
        self.pos = int(starts[-1])
        strings = StringArray(self.buf, starts)
        return strings if count >= LAZY_STRING_ARRAY_MIN else list(strings)


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string(key)
    if vtype == GGUFValueType.ARRAY:
        etype = cur.u32(key)
        count = cur.u64(key)
        if count > MAX_ELEMENTS:
            raise GGUFError(f"absurd array length {count} for {key}")
        if etype == GGUFValueType.STRING:
            return cur.string_array(count, key)
        if etype in GGUF_SCALAR_DTYPES:
            dtype = GGUF_SCALAR_DTYPES[etype]
            start = cur.take(count * np.dtype(dtype).itemsize, key)
            arr = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=start).copy()
            return arr.astype(bool) if etype == GGUFValueType.BOOL else arr
        if etype == GGUFValueType.ARRAY:
            return [_read_value(cur, GGUFValueType.ARRAY, key) for _ in range(count)]
        raise GGUFError(f"unknown array element type {etype} for {key}")
    if vtype in GGUF_SCALAR_DTYPES:
        v = cur.scalar(GGUF_SCALAR_DTYPES[vtype], key)
        if vtype == GGUFValueType.BOOL:
            return bool(v)
        return float(v) if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) else int(v)
    raise GGUFError(f"unknown metadata value type {vtype} for {key}")


class GGUFFile:
    """A memory-mapped GGUF file: `metadata`, `tensors` (name -> TensorInfo) and zero-copy views."""

    def __init__(self, path: str | os.PathLike, no_mmap: bool = False):
        """no_mmap: after parsing, copy the file into anonymous memory advised to use huge pages
        (`bitnet_py.huge_pages`): slower to open, faster to stream from; `mapped` says which."""
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"no such model file: {self.path}")
        self.file_size = os.path.getsize(self.path)
        if self.file_size < 24:
            raise GGUFError(f"{self.path}: not a GGUF file (only {self.file_size} bytes)")
        # kept open for read_rows (the mapped inode, even if the path is replaced); closed by close() or with self
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._close_fd = weakref.finalize(self, os.close, self._fd)
        self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        self._data = np.frombuffer(self._mmap, dtype=np.uint8)
        self.mapped = True
        self._file_map: mmap.mmap | None = None  # after a copy with sparse tensors: the file map they are read from
        self._sparse: frozenset[str] = frozenset()
        self.promotion: Promotion | None = None  # the background copy of the map into huge pages, once started
        self._promote_asked = False
        self._tensor_promotions: dict[str, Promotion | None] = {}  # tensors `promote` skipped, promoted later
        try:
            self._parse()
        except GGUFError as e:
            raise GGUFError(f"{self.path}: {e}") from None
        if no_mmap:
            self.copy_to_anonymous()

    def copy_to_anonymous(self, sparse: set[str] | frozenset[str] = frozenset()) -> None:
        """Copy the file into anonymous memory (no_mmap), except the tensors named in `sparse` (read a few rows
        at a time: the token embedding, a screened head), which stay in the file map and in the page cache."""
        if not self.mapped:
            return
        sparse = frozenset(n for n in sparse if n in self.tensors)
        skip = self.skip_ranges(sparse)
        copied = self.file_size - sum(hi - lo for lo, hi in skip)
        if not fits_in_memory(copied):
            log.warning("no_mmap: %s (%.2f GB to copy) is larger than the memory available; mapping the file "
                        "instead of copying it", self.path, copied / 1e9)
            return
        file_map = self._mmap
        self._mmap = copy_to_anonymous(file_map, self.file_size, skip)
        self._data = np.frombuffer(self._mmap, dtype=np.uint8)
        self._data.flags.writeable = False  # as read-only as the file map it replaces
        self.mapped = False
        if sparse:
            self._file_map, self._sparse = file_map, sparse
            return
        try:
            file_map.close()
        except BufferError:
            pass  # views made while parsing (lazy string arrays) keep the file map; its pages were released

    def skip_ranges(self, names) -> list[tuple[int, int]]:
        """Byte ranges of the named tensors (those of them in the file)."""
        return [(self.tensors[n].offset, self.tensors[n].offset + self.tensors[n].nbytes)
                for n in names if n in self.tensors]

    def promote(self, sparse: set[str] | frozenset[str] = frozenset(),
                also: list[tuple[np.ndarray, list[tuple[int, int]]]] = ()) -> Promotion | None:
        """Start moving the file map into huge pages in the background, in place (bitnet_py.promotion), except the
        tensors named in `sparse`, together with the maps in `also` (a repack cache's), each but its skipped byte
        ranges. Only for a mapped file, once; -> the Promotion (also `self.promotion`), or None where it is not
        possible."""
        if self.mapped and not self._promote_asked:
            self._promote_asked = True
            maps = [(self._data, self.skip_ranges(sparse))] + list(also)
            self.promotion = promote(maps)
        return self.promotion

    def promote_tensor(self, name: str) -> Promotion | None:
        """Start moving one tensor that `promote` skipped into huge pages as well (a screened head that requests
        turn out to read whole), once, and only after `promote` was asked for. -> its Promotion, or None."""
        if not self._promote_asked:
            return None
        if name not in self._tensor_promotions:
            t = self.info(name)
            self._tensor_promotions[name] = promote([(self._data[t.offset:t.offset + t.nbytes], [])])
        return self._tensor_promotions[name]

    def wait_promoted(self) -> None:
        """Block until every promotion started on this file has ended (benchmarks time the weights where they
        stay)."""
        for job in [self.promotion, *self._tensor_promotions.values()]:
            if job is not None:
                job.wait()

    def release(self, view: np.ndarray, read_again: bool = False) -> None:
        """Release the whole pages of `view` (of this file's bytes) from the resident set: from a file map they
        leave it and stay cached (faulted back in if read again); from the anonymous copy they are freed, so
        only views never read again (read_again False) are released there, as from a promoted map."""
        promoted = self.promotion is not None or any(self._tensor_promotions.values())
        for m, in_file in ((self._mmap, self.mapped and not promoted), (self._file_map, True)):
            if m is None:
                continue
            base = np.frombuffer(m, np.uint8)
            start = view.ctypes.data - base.ctypes.data
            if 0 <= start < base.size:
                if in_file or not read_again:
                    release(m, start, start + view.nbytes)
                return

    def _parse(self) -> None:
        cur = _Cursor(memoryview(self._mmap), self.file_size)
        magic = bytes(self._data[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in GGUF_SUPPORTED_VERSIONS:
            raise GGUFError(f"unsupported GGUF version {self.version}")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise GGUFError(f"absurd header counts: {n_tensors} tensors, {n_kv} metadata entries")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.u32(key)
            self.metadata[key] = _read_value(cur, vtype, key)
        align = self.metadata.get(Keys.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"invalid general.alignment {align!r}")
        self.alignment = align
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.u32(name)
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"tensor {name}: {n_dims} dimensions")
            shape = tuple(cur.u64(name) for _ in range(n_dims))
            if any(d <= 0 for d in shape) or np.prod(shape, dtype=np.float64) > MAX_ELEMENTS:
                raise GGUFError(f"tensor {name}: absurd shape {shape}")
            type_id = cur.u32(name)
            rel = cur.u64(name)
            infos.append((name, shape, type_id, rel))
        self.data_offset = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, rel in infos:
            if rel % align:
                raise GGUFError(f"tensor {name}: offset {rel} not aligned to {align}")
            try:
                nbytes = tensor_nbytes(type_id, shape)
            except GGUFError as e:
                raise GGUFError(f"tensor {name}: {e}") from None
            start = self.data_offset + rel
            if start + nbytes > self.file_size:
                raise GGUFError(f"tensor {name} ({type_name(type_id)}, {nbytes} bytes at {start}) "
                                f"runs past the end of the file ({self.file_size} bytes): truncated?")
            if name in self.tensors:
                raise GGUFError(f"duplicate tensor {name}")
            self.tensors[name] = TensorInfo(name, shape, type_id, start, nbytes)

    # ---- access -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get(Keys.ARCHITECTURE)
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: missing general.architecture")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value; `{arch}` in key is replaced by the architecture name."""
        if "{arch}" in key:
            key = key.format(arch=self.architecture)
        return self.metadata.get(key, default)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor {name}")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """uint8[nbytes]: the tensor's data region, zero-copy (from the file map for a sparse tensor of a copy)."""
        t = self.info(name)
        data = self._data if name not in self._sparse else np.frombuffer(self._file_map, np.uint8)
        return data[t.offset:t.offset + t.nbytes]

    def array(self, name: str) -> np.ndarray:
        """Zero-copy typed view in numpy shape for F32/F16/BF16(as uint16)/integer tensors."""
        t = self.info(name)
        dtypes = {GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.BF16: "<u2", GGMLType.F64: "<f8",
                  GGMLType.I8: "<i1", GGMLType.I16: "<i2", GGMLType.I32: "<i4", GGMLType.I64: "<i8"}
        if t.type_id not in dtypes:
            raise GGUFError(f"{self.path}: tensor {name} is {t.type_name}, not a plain array type")
        return self.raw(name).view(dtypes[t.type_id]).reshape(t.np_shape)

    def read_rows(self, name: str, ids) -> np.ndarray:
        """u8[len(ids), row bytes]: rows `ids` (along the first numpy axis) of a tensor, read from the file rather than
        through the map (the token embedding's rows, a screened head's exact rows). Rows read through the map stay in
        this process's resident set, and the kernel maps more than they hold (fault-around, large page-cache folios):
        a screened 2B-4T head's few dozen exact rows per greedy step grew it by ~250 MiB over 400 steps."""
        t = self.info(name)
        n_rows = t.np_shape[0] if t.np_shape else 1
        row_bytes = t.nbytes // max(n_rows, 1)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
            raise IndexError(f"row ids outside [0, {n_rows}) of {name}")
        if not self._close_fd.alive:
            raise GGUFError(f"{self.path}: read after close")
        if not hasattr(os, "preadv"):  # not on this platform: through the map
            return self.raw(name).reshape(n_rows, row_bytes)[ids]
        out = np.empty((ids.size, row_bytes), np.uint8)
        for i, row in enumerate(ids.tolist()):
            if os.preadv(self._fd, [out[i]], t.offset + row * row_bytes) != row_bytes:
                raise GGUFError(f"{self.path}: short read of {name} row {row} (file truncated?)")
        return out

    def row_file(self, name: str) -> tuple[int, int] | None:
        """(file descriptor, byte offset) of a tensor, for compiled code that reads its rows with pread as read_rows
        does (kernels.head_select); None where the platform has no pread."""
        if not self._close_fd.alive:
            raise GGUFError(f"{self.path}: read after close")
        return (self._fd, self.info(name).offset) if hasattr(os, "pread") else None

    def close(self) -> None:
        self._close_fd()
        for job in [self.promotion, *self._tensor_promotions.values()]:
            if job is not None:
                job.stop()
        self._data = None  # type: ignore[assignment]
        for m in (self._mmap, self._file_map):
            try:
                if m is not None:
                    m.close()
            except BufferError:
                pass  # views still alive; the mapping goes away with them

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
