"""Ternary weights in the base-3 layout (kernels.b3_simd) at load: repacked from I2_S bytes into one huge-page
arena, or mapped from the repack cache (entries `<name>` + B3_SUFFIX). bitnet_py.weights decides which
tensors (kernels.select.use_b3)."""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from kernels.b3_simd import b3_bytes, pack_b3_from_i2s
from kernels.select import use_b3

from .gguf.constants import GGMLType
from .gguf.reader import GGUFFile
from .huge_pages import zeros
from .repack_cache import RepackCache, read_only

log = logging.getLogger(__name__)

B3_SUFFIX = "#b3"  # repack cache entry of a tensor in the base-3 layout


class B3Arena:
    """One anonymous map (huge pages where offered) for the base-3 tensors a load builds: a map per tensor
    (0.3-3.6 MB at 2B-4T) holds few whole 2 MiB pages, and 2B-4T's decode matmuls on such 4 KiB pages ran no
    faster than I2_S's on huge pages. Untouched space (a tensor that stays I2_S) is never resident."""

    def __init__(self, nbytes: int):
        self.data = zeros(nbytes, np.uint8)
        self.used = 0

    @staticmethod
    def size(f: GGUFFile) -> int:
        """Bytes for every tensor of f that may go to the base-3 layout (each at a 4 KiB boundary)."""
        return sum((b3_bytes(*t.np_shape) + 4095) // 4096 * 4096 for t in f.tensors.values()
                   if t.type_id in (GGMLType.I2_S, GGMLType.TL2) and len(t.np_shape) == 2 and use_b3(*t.np_shape))

    def take(self, nbytes: int) -> np.ndarray:
        if self.used + nbytes > self.data.size:
            return zeros(nbytes, np.uint8)
        out = self.data[self.used:self.used + nbytes]
        self.used += (nbytes + 4095) // 4096 * 4096
        return out


def to_b3(f: GGUFFile, name: str, w, raw: np.ndarray | None, repacked: RepackCache | None,
          arena: B3Arena | None = None):
    """w (I2_S layout) -> the same weight in the base-3 layout (in `arena`), cached as name + B3_SUFFIX; w itself
    where a row tile holds a code 3 (no ternary value). raw: the file bytes read for it, released from the
    resident set."""
    n = b3_bytes(w.m, w.k)
    out = arena.take(n) if arena is not None else zeros(n, np.uint8)
    if pack_b3_from_i2s(w.packed, w.m, w.k, out):
        log.warning("%s holds 2-bit codes outside the ternary values; kept in the I2_S layout", name)
        return w
    if raw is not None:
        f.release(raw)  # only the base-3 copy is read from here on
    if repacked is not None:
        repacked.put(name + B3_SUFFIX, out)
    return replace(w, packed=read_only(out), layout="b3")


def cached_b3(name: str, m: int, k: int, repacked: RepackCache | None) -> np.ndarray | None:
    return repacked.get(name + B3_SUFFIX, b3_bytes(m, k)) if repacked is not None and use_b3(m, k) else None
