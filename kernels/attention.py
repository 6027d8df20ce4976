"""Causal attention over a paged float16 KV cache with grouped-query heads.

Arithmetic as llama.cpp: scores = (f16(q) . k) * scale in float32, softmax with expf and a double sum,
probabilities optionally rounded to float16 (bitnet.cpp does that for one-token decode calls), then p . v.
"""
import math

import numpy as np
from numba import njit, prange

from .config import JIT_PARALLEL
from .f16 import round_to_f16


@njit(**JIT_PARALLEL)
def paged_attention(q, k_cache, v_cache, positions, seq_index, block_tables, block_size, round_probs,
                    scale, lut, out):
    """q: f32[T, H, D] (already rounded to f16 values); k_cache, v_cache: u16[S_slots, KVH, D] (f16 bits);
    positions, seq_index: i32[T]; block_tables: i32[S, B]; round_probs: bool[S]; lut: f32[65536]
    -> out: f32[T, H, D]."""
    T, H, D = q.shape
    KVH = k_cache.shape[1]
    group = H // KVH
    for th in prange(T * H):
        t = th // H
        h = th % H
        kvh = h // group
        s = seq_index[t]
        n = positions[t] + 1
        scores = np.empty(n, dtype=np.float32)
        slots = np.empty(n, dtype=np.int64)
        best = np.float32(-np.inf)
        for j in range(n):
            slot = np.int64(block_tables[s, j // block_size]) * block_size + j % block_size
            slots[j] = slot
            acc = np.float32(0.0)
            for d in range(D):
                acc += q[t, h, d] * lut[k_cache[slot, kvh, d]]
            v = acc * scale
            scores[j] = v
            if v > best:
                best = v
        total = 0.0
        for j in range(n):
            e = np.float32(math.exp(scores[j] - best))
            scores[j] = e
            total += np.float64(e)
        inv = np.float32(1.0 / total)
        rp = round_probs[s]
        for j in range(n):
            p = scores[j] * inv
            if rp:
                p = round_to_f16(p)
            scores[j] = p
        for d in range(D):
            out[t, h, d] = 0.0
        for j in range(n):
            p = scores[j]
            slot = slots[j]
            for d in range(D):
                out[t, h, d] += p * lut[v_cache[slot, kvh, d]]
