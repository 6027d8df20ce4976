"""Paged KV storage: k, v [n_layer, n_kv_head, n_blocks * block_size, head_dim], as float16 bits (uint16,
cache type "f16", what llama.cpp/bitnet.cpp use) or float32 (cache type "f32", what float32 frameworks use),
zeroed, in memory advised huge pages (`bitnet_py.huge_pages.zeros`).

Each KV head's rows are contiguous (kernels.attention.CACHE_LAYOUT), so attention streams one head's keys
block_size rows at a time. With [slot, KV head, dim] (up to the eleventh session) one head's rows were 1280 bytes
apart in 2B-4T: 30 layers of one decode step at 4096 keys, 2 threads, took 46.6 ms against 34.3 now, and the
model at depth 4000 decodes 1.157x faster (scripts/bench_ab.py, 6 of 6 rounds).

Physical slot of position p of a sequence = block_tables[seq, p // block_size] * block_size + p % block_size.
Allocation (which blocks a sequence owns) is the engine's block manager's job; this only holds the arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import huge_pages

CACHE_DTYPES = {"f16": np.uint16, "f32": np.float32}


@dataclass
class KVCache:
    k: np.ndarray  # u16[L, KVH, n_slots, D] (float16 bits) or f32[L, KVH, n_slots, D]
    v: np.ndarray  # same as k
    block_size: int

    @classmethod
    def allocate(cls, n_layer: int, n_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 cache_type: str = "f16") -> "KVCache":
        if n_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs n_blocks > 0 and block_size > 0, got {n_blocks}, {block_size}")
        if cache_type not in CACHE_DTYPES:
            raise ValueError(f"cache type must be one of {sorted(CACHE_DTYPES)}, got {cache_type!r}")
        shape = (n_layer, n_kv_head, n_blocks * block_size, head_dim)
        dtype = CACHE_DTYPES[cache_type]
        return cls(huge_pages.zeros(shape, dtype), huge_pages.zeros(shape, dtype), block_size)

    @property
    def is_f32(self) -> bool:
        return self.k.dtype == np.float32

    @property
    def n_blocks(self) -> int:
        return self.k.shape[2] // self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, cache_type: str = "f16") -> int:
        return 2 * np.dtype(CACHE_DTYPES[cache_type]).itemsize * n_layer * n_kv_head * head_dim
