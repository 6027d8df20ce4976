"""Faster drop-in for kernels.attention.paged_attention (same signature and arithmetic steps).

Differences: float16 K/V are widened with the hardware conversion (`kernels.simd.f16_to_f32`, exact, so
vectorizable) instead of table gathers, the q.k dot products sum with reassociation (8-wide partial sums,
as ggml's own f16 dot product does) instead of one sequential float32 chain, and softmax exponentials come
from `kernels.expf` (<= 1 ulp from exact, vectorized; ggml's SIMD softmax also uses a polynomial) instead of
libm. The double sum of the exponentials, the optional float16 rounding of probabilities and the p.v
accumulation order are unchanged. Work is split per (token, KV head), so each float16 K/V row is widened once
for all query heads of its group (GQA) instead of once per head; groups of 4 (2B-4T, Llama-3-8B) take
register-blocked paths (four q.k sums per K element; p.v over 4 keys x 4 heads per vector of V) with the same
p.v order.
Only built where the host converts float16 in hardware (`HAVE_F16C`); model.py falls back otherwise.
"""

import numpy as np
from numba import njit, prange

from .config import JIT, JIT_MAX, JIT_PARALLEL, JIT_REDUCE
from .expf import expf_nonpositive
from .simd import HAVE_F16C

PV_KEYS = 4  # keys per register-blocked p.v step (GQA groups of 4)

if HAVE_F16C:
    from .simd import f16_to_f32, f32_to_f16_bits

    @njit(**JIT)
    def _load_row(c16, c32, use_f32, slot, kvh, buf):
        """Cache row [slot, kvh, :] -> buf: f32[D], from the float32 cache or widened (exactly) from float16."""
        if use_f32:
            for d in range(buf.shape[0]):
                buf[d] = c32[slot, kvh, d]
        else:
            for d in range(buf.shape[0]):
                buf[d] = f16_to_f32(c16[slot, kvh, d])

    @njit(**JIT_REDUCE)
    def _dot(q, t, h, row):
        acc = np.float32(0.0)
        for d in range(row.shape[0]):
            acc += q[t, h, d] * row[d]
        return acc

    @njit(**JIT_REDUCE)
    def _qk4_f16(q, t, h0, k16, slot, kvh):
        """Four query heads h0..h0+3 against one f16 K row, widened once per element (GQA group of 4)."""
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for d in range(q.shape[2]):
            kd = f16_to_f32(k16[slot, kvh, d])
            a0 += q[t, h0, d] * kd
            a1 += q[t, h0 + 1, d] * kd
            a2 += q[t, h0 + 2, d] * kd
            a3 += q[t, h0 + 3, d] * kd
        return a0, a1, a2, a3

    @njit(**JIT_REDUCE)
    def _qk4x2_f16(q, t, h0, k16, s0, s1, kvh):
        """`_qk4_f16` for two K rows (slots s0, s1) at once: each q element loaded once for 8 sums, half the
        per-key loop overhead and horizontal reductions."""
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        for d in range(q.shape[2]):
            k0 = f16_to_f32(k16[s0, kvh, d])
            k1 = f16_to_f32(k16[s1, kvh, d])
            q0, q1, q2, q3 = q[t, h0, d], q[t, h0 + 1, d], q[t, h0 + 2, d], q[t, h0 + 3, d]
            a0 += q0 * k0
            a1 += q1 * k0
            a2 += q2 * k0
            a3 += q3 * k0
            b0 += q0 * k1
            b1 += q1 * k1
            b2 += q2 * k1
            b3 += q3 * k1
        return a0, a1, a2, a3, b0, b1, b2, b3

    @njit(**JIT)
    def _put4(scores, j, a0, a1, a2, a3, scale):
        scores[0, j] = a0 * scale
        scores[1, j] = a1 * scale
        scores[2, j] = a2 * scale
        scores[3, j] = a3 * scale

    @njit(**JIT_MAX)
    def _row_max(scores, g, n):
        """max of scores[g, :n] (order-free, vectorizes)."""
        best = np.float32(-np.inf)
        for j in range(n):
            if scores[g, j] > best:
                best = scores[g, j]
        return best

    @njit(**JIT)
    def _exp_sums4(scores, n):
        """Double sums of scores[0..3, :n], each in key order (the reference order), the four chains
        interleaved so that they overlap instead of waiting on one add latency after another."""
        s0 = s1 = s2 = s3 = 0.0
        for j in range(n):
            s0 += np.float64(scores[0, j])
            s1 += np.float64(scores[1, j])
            s2 += np.float64(scores[2, j])
            s3 += np.float64(scores[3, j])
        return s0, s1, s2, s3

    @njit(**JIT)
    def _pv4_f16(scores, slots, j0, v16, kvh, acc):
        """acc[g, d] += scores[g, j] * v[j, d] for the 4 keys j0..j0+3 and the 4 heads g of a group, keys in
        order for every (g, d) (the reference order, no reassociation). Probabilities and slots are read into
        registers first, so the d loop vectorizes and each V element is widened once for the 4 heads."""
        s0, s1, s2, s3 = slots[j0], slots[j0 + 1], slots[j0 + 2], slots[j0 + 3]
        p00, p01, p02, p03 = scores[0, j0], scores[0, j0 + 1], scores[0, j0 + 2], scores[0, j0 + 3]
        p10, p11, p12, p13 = scores[1, j0], scores[1, j0 + 1], scores[1, j0 + 2], scores[1, j0 + 3]
        p20, p21, p22, p23 = scores[2, j0], scores[2, j0 + 1], scores[2, j0 + 2], scores[2, j0 + 3]
        p30, p31, p32, p33 = scores[3, j0], scores[3, j0 + 1], scores[3, j0 + 2], scores[3, j0 + 3]
        for d in range(acc.shape[1]):
            v0 = f16_to_f32(v16[s0, kvh, d])
            v1 = f16_to_f32(v16[s1, kvh, d])
            v2 = f16_to_f32(v16[s2, kvh, d])
            v3 = f16_to_f32(v16[s3, kvh, d])
            acc[0, d] = (((acc[0, d] + p00 * v0) + p01 * v1) + p02 * v2) + p03 * v3
            acc[1, d] = (((acc[1, d] + p10 * v0) + p11 * v1) + p12 * v2) + p13 * v3
            acc[2, d] = (((acc[2, d] + p20 * v0) + p21 * v1) + p22 * v2) + p23 * v3
            acc[3, d] = (((acc[3, d] + p30 * v0) + p31 * v1) + p32 * v2) + p33 * v3

    @njit(**JIT_PARALLEL)
    def paged_attention_fast(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                             round_probs, scale, lut, out):
        """Same contract as kernels.attention.paged_attention (lut is unused). One task per (token, KV head):
        each K/V row is widened once for the `group` query heads that share it."""
        T, H, D = q.shape
        KVH = k32.shape[1] if use_f32 else k16.shape[1]
        group = H // KVH
        fast4 = group == 4 and not use_f32  # 2B-4T, Llama-3-8B: four query heads per f16 K/V head
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
                slots[j] = np.int64(block_tables[s, j // block_size]) * block_size + j % block_size
            j = 0
            if fast4:
                while j + 2 <= n:
                    a0, a1, a2, a3, b0, b1, b2, b3 = _qk4x2_f16(q, t, kvh * 4, k16, slots[j], slots[j + 1], kvh)
                    _put4(scores, j, a0, a1, a2, a3, scale)
                    _put4(scores, j + 1, b0, b1, b2, b3, scale)
                    j += 2
                if j < n:
                    a0, a1, a2, a3 = _qk4_f16(q, t, kvh * 4, k16, slots[j], kvh)
                    _put4(scores, j, a0, a1, a2, a3, scale)
            else:
                for j in range(n):
                    _load_row(k16, k32, use_f32, slots[j], kvh, row)
                    for g in range(group):
                        scores[g, j] = _dot(q, t, kvh * group + g, row) * scale
            totals = np.zeros(group, dtype=np.float64)
            for g in range(group):
                best = _row_max(scores, g, n)
                for j in range(n):  # vectorizes (kernels.expf), unlike a libm call per score
                    scores[g, j] = expf_nonpositive(scores[g, j] - best)
            if group == 4:
                totals[0], totals[1], totals[2], totals[3] = _exp_sums4(scores, n)
            else:
                for g in range(group):
                    for j in range(n):
                        totals[g] += np.float64(scores[g, j])
            for g in range(group):
                inv = np.float32(1.0 / totals[g])
                for j in range(n):
                    p = scores[g, j] * inv
                    if rp:
                        p = f16_to_f32(f32_to_f16_bits(p))  # = round_to_f16(p), in hardware
                    scores[g, j] = p
            acc = np.zeros((group, D), dtype=np.float32)
            j_start = 0
            if fast4:
                while j_start + PV_KEYS <= n:
                    _pv4_f16(scores, slots, j_start, v16, kvh, acc)
                    j_start += PV_KEYS
            for j in range(j_start, n):
                _load_row(v16, v32, use_f32, slots[j], kvh, row)
                for g in range(group):
                    p = scores[g, j]
                    for d in range(D):
                        acc[g, d] += p * row[d]
            for g in range(group):
                for d in range(D):
                    out[t, kvh * group + g, d] = acc[g, d]
else:
    from .attention import paged_attention as paged_attention_fast  # noqa: F401
