"""Causal attention over a paged float16 KV cache with grouped-query heads.

Arithmetic as llama.cpp: scores = (f16(q) . k) * scale in float32, softmax with expf and a double sum,
probabilities optionally rounded to float16 (bitnet.cpp does that for one-token decode calls), then p . v.
A float32 cache (no roundings anywhere) reproduces float32 frameworks such as Hugging Face transformers.
"""
import math

import numpy as np
from numba import njit, prange

from .config import JIT_PARALLEL
from .f16 import round_to_f16

CACHE_LAYOUT = "heads_first"  # every attention kernel reads caches [KVH, n_slots, D] (bitnet_py.kv_cache)


@njit(**JIT_PARALLEL)
def paged_attention(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                    round_probs, scale, lut, out):
    """q: f32[T, H, D]; the cache is either k16, v16: u16[KVH, S_slots, D] (f16 bits, decoded through
    lut: f32[65536]) or, when use_f32, k32, v32: f32[KVH, S_slots, D] (the unused pair may be empty);
    positions, seq_index: i32[T]; block_tables: i32[S, B]; round_probs: bool[S] -> out: f32[T, H, D]."""
    T, H, D = q.shape
    KVH = k32.shape[0] if use_f32 else k16.shape[0]
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
            if use_f32:
                for d in range(D):
                    acc += q[t, h, d] * k32[kvh, slot, d]
            else:
                for d in range(D):
                    acc += q[t, h, d] * lut[k16[kvh, slot, d]]
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
            if use_f32:
                for d in range(D):
                    out[t, h, d] += p * v32[kvh, slot, d]
            else:
                for d in range(D):
                    out[t, h, d] += p * lut[v16[kvh, slot, d]]
