"""Upstream ggml's arithmetic for block-scaled ternary weights (TQ1_0, TQ2_0): activations quantized per
block of 256 (Q8_K), one float scale per (row, block) on the weight side.

Q8_K, per token row and block: amax = max|x_j|, max = the signed x_j where it is first reached;
amax == 0 -> d = 0, q = 0; else iscale = float32(-127 / max), q_j = min(127, round_half_even(iscale * x_j)),
d = float32(1 / iscale). Matmul: y_m = sum over blocks b, in order, of float32(sumi_b) * float32(d_x[b] * d_w[m, b])
with sumi_b = sum_j (code_mj - 1) * q_j exact.
"""
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL

QK_K = 256


@njit(**JIT)
def quantize_q8k(x, q, d):
    """x: f32[T, K] (K % 256 == 0) -> q: i8[T, K], d: f32[T, K/256]."""
    T, K = x.shape
    for t in range(T):
        for b in range(K // QK_K):
            k0 = b * QK_K
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(QK_K):
                v = x[t, k0 + j]
                if abs(v) > amax:
                    amax = abs(v)
                    mx = v
            if amax == 0.0:
                d[t, b] = 0.0
                for j in range(QK_K):
                    q[t, k0 + j] = 0
                continue
            iscale = np.float32(-127.0) / mx
            for j in range(QK_K):
                v = np.rint(iscale * x[t, k0 + j])
                q[t, k0 + j] = np.int32(v) if v < 127.0 else 127
            d[t, b] = np.float32(1.0) / iscale


@njit(**JIT_PARALLEL)
def tq_matmul_q8k(packed, q, d_x, block_scales, out):
    """packed: u8[M*K/4] (I2_S layout); q: i8[T, K]; d_x: f32[T, K/256]; block_scales: f32[M, K/256]
    -> out: f32[T, M]."""
    T, K = q.shape
    M = out.shape[1]
    row_bytes = K // 4
    for m in prange(M):
        base = m * row_bytes
        for t in range(T):
            acc = np.float32(0.0)
            for b2 in range(K // QK_K):
                sumi = 0
                for half in range(2):
                    o = base + (2 * b2 + half) * 32
                    k0 = (2 * b2 + half) * 128
                    for p in range(32):
                        byte = np.int32(packed[o + p])
                        sumi += ((((byte >> 6) & 3) - 1) * np.int32(q[t, k0 + p])
                                 + (((byte >> 4) & 3) - 1) * np.int32(q[t, k0 + 32 + p])
                                 + (((byte >> 2) & 3) - 1) * np.int32(q[t, k0 + 64 + p])
                                 + ((byte & 3) - 1) * np.int32(q[t, k0 + 96 + p]))
                acc += np.float32(sumi) * np.float32(d_x[t, b2] * block_scales[m, b2])
            out[t, m] = acc
