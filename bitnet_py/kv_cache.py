"""Paged float16 KV storage: k, v as float16 bits (uint16) [n_layer, n_blocks * block_size, n_kv_head, head_dim].

Physical slot of position p of a sequence = block_tables[seq, p // block_size] * block_size + p % block_size.
Allocation (which blocks a sequence owns) is the engine's block manager's job; this only holds the arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KVCache:
    k: np.ndarray  # u16[L, n_slots, KVH, D] (float16 bits)
    v: np.ndarray  # u16[L, n_slots, KVH, D]
    block_size: int

    @classmethod
    def allocate(cls, n_layer: int, n_blocks: int, block_size: int, n_kv_head: int, head_dim: int) -> "KVCache":
        if n_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs n_blocks > 0 and block_size > 0, got {n_blocks}, {block_size}")
        shape = (n_layer, n_blocks * block_size, n_kv_head, head_dim)
        return cls(np.zeros(shape, dtype=np.uint16), np.zeros(shape, dtype=np.uint16), block_size)

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1] // self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int) -> int:
        return 2 * 2 * n_layer * n_kv_head * head_dim
