"""A GGUF string array read in place: a read-only sequence of str decoded from the memory map on access.

A 128k-token vocabulary plus ~280k BPE merges held as Python str lists costs ~30 MB of heap; this keeps one
int64 offset per string (~3 MB) and decodes an element when it is indexed. Element i is stored as a u64 length
at `starts[i]` followed by that many UTF-8 bytes, which end where element i+1 begins (`starts[i + 1]`).
Invalid UTF-8 decodes with U+FFFD replacements, as the eager reader did.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from itertools import pairwise
from operator import index as as_index

import numpy as np

_U64 = struct.Struct("<Q")
LENGTH_BYTES = _U64.size


def scan_string_array(buf, pos: int, count: int, end: int, max_len: int) -> np.ndarray:
    """int64[count + 1]: where each of `count` strings starts in `buf` (its u64 length), then the end of the
    last. Raises ValueError when a length is over `max_len` or a string runs past `end`. A 2B-4T file's vocabulary
    and merges (2 x 128k strings) take ~60 ms: the reads go through a view that ends at `end` (a read past it is
    the truncation error), and the offsets into a list (numpy item stores made the loop ~4x slower)."""
    if count * LENGTH_BYTES > end - pos:  # before allocating: every string takes at least its length field
        raise ValueError("file truncated")
    view = memoryview(buf)[:end]
    starts = [0] * (count + 1)
    unpack = _U64.unpack_from
    try:
        for i in range(count):
            starts[i] = pos
            (n,) = unpack(view, pos)
            if n > max_len:
                raise ValueError(f"absurd string length {n}")
            pos += LENGTH_BYTES + n
    except struct.error:
        raise ValueError("file truncated") from None
    if pos > end:
        raise ValueError("file truncated")
    starts[count] = pos
    return np.array(starts, np.int64)


class StringArray(Sequence):
    """Read-only sequence of str over a buffer (the GGUF memory map); slices give lists."""

    __slots__ = ("_buf", "_starts")

    def __init__(self, buf, starts: np.ndarray):
        self._buf = memoryview(buf)
        self._starts = starts  # int64[n + 1], see scan_string_array

    def __len__(self) -> int:
        return len(self._starts) - 1

    def _index(self, i) -> int:
        i = as_index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"string array index {i} out of range ({n} strings)")
        return i

    def raw(self, i) -> bytes:
        """The stored bytes of element i (not decoded)."""
        i = self._index(i)
        return bytes(self._buf[int(self._starts[i]) + LENGTH_BYTES:int(self._starts[i + 1])])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = self._index(i)
        return str(self._buf[int(self._starts[i]) + LENGTH_BYTES:int(self._starts[i + 1])], "utf-8", "replace")

    def __iter__(self) -> Iterator[str]:
        buf = self._buf
        for a, b in pairwise(self._starts.tolist()):
            yield str(buf[a + LENGTH_BYTES:b], "utf-8", "replace")

    def byte_lengths(self) -> np.ndarray:
        """int64[n]: the stored (UTF-8) length of each element."""
        return np.diff(self._starts) - LENGTH_BYTES

    def find(self, texts) -> dict[str, int]:
        """{text: last index holding it} for those of `texts` that occur. Only elements whose stored length
        equals a text's UTF-8 length are decoded (exact: invalid stored bytes decode with U+FFFD, so a text
        without U+FFFD can only equal an element with exactly its bytes)."""
        texts = set(texts)
        if any("\ufffd" in t for t in texts):
            return {t: i for i, t in enumerate(self) if t in texts}
        wanted = {}
        for t in texts:
            try:
                wanted[t.encode("utf-8")] = t
            except UnicodeEncodeError:  # lone surrogates: no decoded element can equal them
                pass
        if not wanted:
            return {}
        candidates = np.flatnonzero(np.isin(self.byte_lengths(), [len(b) for b in wanted]))
        found: dict[str, int] = {}
        for i in candidates.tolist():
            text = wanted.get(self.raw(i))
            if text is not None:
                found[text] = i
        return found

    def __contains__(self, value) -> bool:
        if isinstance(value, str):
            return bool(self.find((value,)))
        return super().__contains__(value)

    def tolist(self) -> list[str]:
        return list(self)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (StringArray, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = len(self)
        head = ", ".join(repr(s) for s in self[:3])
        return f"StringArray([{head}{', ...' if n > 3 else ''}], {n} strings)"
