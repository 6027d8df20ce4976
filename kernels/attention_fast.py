"""Faster drop-in for kernels.attention.paged_attention (same signature and arithmetic steps).

Differences: float16 K/V are widened with the hardware conversion (`kernels.simd.f16_to_f32`, exact, so
vectorizable) instead of table gathers, the q.k dot products sum with reassociation (8-wide partial sums,
as ggml's own f16 dot product does) instead of one sequential float32 chain, and softmax exponentials come
from `kernels.expf` (<= 1 ulp from exact, vectorized; ggml's SIMD softmax also uses a polynomial) instead of
libm. The double sum of the exponentials, the optional float16 rounding of probabilities and the p.v
accumulation order are unchanged. Work is split per (token, KV head), so each float16 K/V row is widened once
for all query heads of its group (GQA) instead of once per head.
Only built where the host converts float16 in hardware (`HAVE_F16C`); model.py falls back otherwise.
"""

import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL, JIT_REDUCE
from .expf import expf_nonpositive
from .f16 import round_to_f16
from .simd import HAVE_F16C

if HAVE_F16C:
    from .simd import f16_to_f32

    @njit(**JIT)
    def _widen_row(k16, slot, kvh, buf):
        """k16[slot, kvh, :] (float16 bits) -> buf: f32[D] (exact)."""
        for d in range(buf.shape[0]):
            buf[d] = f16_to_f32(k16[slot, kvh, d])

    @njit(**JIT_REDUCE)
    def _dot(q, t, h, row):
        acc = np.float32(0.0)
        for d in range(row.shape[0]):
            acc += q[t, h, d] * row[d]
        return acc

    @njit(**JIT_PARALLEL)
    def paged_attention_fast(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                             round_probs, scale, lut, out):
        """Same contract as kernels.attention.paged_attention (lut is unused). One task per (token, KV head):
        each K/V row is widened once for the `group` query heads that share it."""
        T, H, D = q.shape
        KVH = k32.shape[1] if use_f32 else k16.shape[1]
        group = H // KVH
        for task in prange(T * KVH):
            t = task // KVH
            kvh = task % KVH
            s = seq_index[t]
            n = positions[t] + 1
            rp = round_probs[s]
            scores = np.empty((group, n), dtype=np.float32)
            slots = np.empty(n, dtype=np.int64)
            row = np.empty(D, dtype=np.float32)
            for j in range(n):
                slot = np.int64(block_tables[s, j // block_size]) * block_size + j % block_size
                slots[j] = slot
                if use_f32:
                    for d in range(D):
                        row[d] = k32[slot, kvh, d]
                else:
                    _widen_row(k16, slot, kvh, row)
                for g in range(group):
                    scores[g, j] = _dot(q, t, kvh * group + g, row) * scale
            for g in range(group):
                best = np.float32(-np.inf)
                for j in range(n):
                    if scores[g, j] > best:
                        best = scores[g, j]
                for j in range(n):  # vectorizes (kernels.expf), unlike a libm call per score
                    scores[g, j] = expf_nonpositive(scores[g, j] - best)
                total = 0.0
                for j in range(n):
                    total += np.float64(scores[g, j])
                inv = np.float32(1.0 / total)
                for j in range(n):
                    p = scores[g, j] * inv
                    if rp:
                        p = round_to_f16(p)
                    scores[g, j] = p
            acc = np.zeros((group, D), dtype=np.float32)
            for j in range(n):
                slot = slots[j]
                if use_f32:
                    for d in range(D):
                        row[d] = v32[slot, kvh, d]
                else:
                    _widen_row(v16, slot, kvh, row)
                for g in range(group):
                    p = scores[g, j]
                    for d in range(D):
                        acc[g, d] += p * row[d]
            for g in range(group):
                for d in range(D):
                    out[t, kvh * group + g, d] = acc[g, d]
else:
    from .attention import paged_attention as paged_attention_fast  # noqa: F401
