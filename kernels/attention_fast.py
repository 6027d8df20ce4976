"""Faster drop-in for kernels.attention.paged_attention (same signature and arithmetic steps).

Differences: float16 K/V are widened with the hardware conversion (`kernels.simd.f16_to_f32`, exact, so
vectorizable) instead of table gathers, and the q.k dot products sum with reassociation (8-wide partial sums,
as ggml's own f16 dot product does) instead of one sequential float32 chain. Softmax, the optional float16
rounding of probabilities and the p.v accumulation order are unchanged, so p.v sums are bit-identical.
Only built where the host converts float16 in hardware (`HAVE_F16C`); model.py falls back otherwise.
"""
import math

import numpy as np
from numba import njit, prange

from .config import JIT_PARALLEL, JIT_REDUCE
from .f16 import round_to_f16
from .simd import HAVE_F16C

if HAVE_F16C:
    from .simd import f16_to_f32

    @njit(**JIT_REDUCE)
    def _qk16(q, t, h, k16, slot, kvh):
        acc = np.float32(0.0)
        for d in range(q.shape[2]):
            acc += q[t, h, d] * f16_to_f32(k16[slot, kvh, d])
        return acc

    @njit(**JIT_REDUCE)
    def _qk32(q, t, h, k32, slot, kvh):
        acc = np.float32(0.0)
        for d in range(q.shape[2]):
            acc += q[t, h, d] * k32[slot, kvh, d]
        return acc

    @njit(**JIT_PARALLEL)
    def paged_attention_fast(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                             round_probs, scale, lut, out):
        """Same contract as kernels.attention.paged_attention (lut is unused)."""
        T, H, D = q.shape
        KVH = k32.shape[1] if use_f32 else k16.shape[1]
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
                acc = _qk32(q, t, h, k32, slot, kvh) if use_f32 else _qk16(q, t, h, k16, slot, kvh)
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
                        out[t, h, d] += p * v32[slot, kvh, d]
                else:
                    for d in range(D):
                        out[t, h, d] += p * f16_to_f32(v16[slot, kvh, d])
else:
    from .attention import paged_attention as paged_attention_fast  # noqa: F401
