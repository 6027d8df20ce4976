"""Upstream ggml's arithmetic for block-scaled ternary weights (TQ1_0, TQ2_0): activations quantized per
block of 256 (Q8_K), one float scale per (row, block) on the weight side.

Q8_K, per token row and block: amax = max|x_j|, max = the signed x_j where it is first reached;
amax == 0 -> d = 0, q = 0; else iscale = float32(-127 / max), q_j = min(127, round_half_even(iscale * x_j)),
d = float32(1 / iscale). Matmul: y_m = sum over blocks b, in order, of float32(sumi_b) * float32(d_x[b] * d_w[m, b])
with sumi_b = sum_j (code_mj - 1) * q_j exact.

Weights arrive repacked to I2_S's byte layout (bitnet_py.weights), so `tq_matmul_q8k` takes a row's 256-block
dots and float terms from kernels.simd_blocks (one call per row and 4 tokens, `vpmaddubsw`) on AVX2 hosts, or one
kernels.simd_vnni dot per block on VNNI hosts; `tq_matmul_q8k_multi` runs two or three weights on the same
activations (q/k/v, gate/up) in one parallel region; `tq_matmul_q8k_plain` is the plain loop, with identical
results. The last argument `n_threads` sizes the row tasks, as in kernels.ternary_matmul.
"""
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL
from .tasks import balanced_rows_per_task, n_tasks3, task3
from .simd import HAVE_AVX2, HAVE_VNNI

QK_K = 256


@njit(**JIT)
def _quantize_q8k_row(x, q, d, t):
    """Token row t of x -> q[t], d[t] (Q8_K, see the module docstring)."""
    K = x.shape[1]
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


@njit(**JIT)
def quantize_q8k(x, q, d):
    """x: f32[T, K] (K % 256 == 0) -> q: i8[T, K], d: f32[T, K/256]."""
    for t in range(x.shape[0]):
        _quantize_q8k_row(x, q, d, t)


@njit(**JIT_PARALLEL)
def quantize_q8k_parallel(x, q, d):
    """Same as quantize_q8k, token rows split over threads (for many rows: a parallel region costs more than
    a few rows)."""
    for t in prange(x.shape[0]):
        _quantize_q8k_row(x, q, d, t)


ROWS_PER_TASK = 32


@njit(**JIT)
def _block_sums(q, qsums):
    """q: i8[T, K] -> qsums: i32[T, K/256], the sum of each token's q over each 256-block."""
    T, K = q.shape
    for t in range(T):
        for b in range(K // QK_K):
            s = 0
            for j in range(QK_K):
                s += np.int32(q[t, b * QK_K + j])
            qsums[t, b] = s


@njit(**JIT)
def _tq_rows_plain(packed, q, qsums, d_x, block_scales, out, m_lo, m_hi):
    """Rows [m_lo, m_hi) of out, plain loops: sum(code * q) - sum(q) per 256-block, the blocks' float terms
    added in block order (the reference of the SIMD rows; the rows on hosts without AVX2)."""
    T, K = q.shape
    row_bytes = K // 4
    for m in range(m_lo, m_hi):
        for t in range(T):
            acc = np.float32(0.0)
            for b2 in range(K // QK_K):
                sumi = 0
                for half in range(2):
                    o = m * row_bytes + (2 * b2 + half) * 32
                    k0 = (2 * b2 + half) * 128
                    for p in range(32):
                        byte = np.int32(packed[o + p])
                        sumi += (((byte >> 6) & 3) * np.int32(q[t, k0 + p])
                                 + ((byte >> 4) & 3) * np.int32(q[t, k0 + 32 + p])
                                 + ((byte >> 2) & 3) * np.int32(q[t, k0 + 64 + p])
                                 + (byte & 3) * np.int32(q[t, k0 + 96 + p]))
                acc += np.float32(sumi - qsums[t, b2]) * np.float32(d_x[t, b2] * block_scales[m, b2])
            out[t, m] = acc


@njit(**JIT_PARALLEL)
def tq_matmul_q8k_plain(packed, q, d_x, block_scales, out, n_threads):
    """packed: u8[M*K/4] (I2_S layout); q: i8[T, K]; d_x: f32[T, K/256]; block_scales: f32[M, K/256]
    -> out: f32[T, M]. Plain loops (any host; the reference of the SIMD kernel in the tests)."""
    T, K = q.shape
    M = out.shape[1]
    qsums = np.empty((T, K // QK_K), np.int32)
    _block_sums(q, qsums)
    r = balanced_rows_per_task(ROWS_PER_TASK, M, 0, 0, n_threads)
    for task in prange(n_tasks3(r, M, 0, 0)):
        _tq_rows_plain(packed, q, qsums, d_x, block_scales, out, task * r, min(M, task * r + r))


if HAVE_AVX2:
    if HAVE_VNNI:  # vpdpbusd dots, one call per block, behind kernels.simd_blocks' contracts
        from .simd_vnni import i2s_dot1, i2s_dot4

        @njit(**JIT)
        def _block_scaled_dots4(packed, w0, q, q0, q_stride, n_b, q_sums, d_x, scales, s0):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for b in range(n_b):
                d0, d1, d2, d3 = i2s_dot4(packed, w0 + b * 64, q, q0 + b * QK_K, q_stride, 2)
                s = scales[s0 + b]
                a0 += np.float32(d0 - q_sums[4 * b]) * np.float32(d_x[4 * b] * s)
                a1 += np.float32(d1 - q_sums[4 * b + 1]) * np.float32(d_x[4 * b + 1] * s)
                a2 += np.float32(d2 - q_sums[4 * b + 2]) * np.float32(d_x[4 * b + 2] * s)
                a3 += np.float32(d3 - q_sums[4 * b + 3]) * np.float32(d_x[4 * b + 3] * s)
            return a0, a1, a2, a3

        @njit(**JIT)
        def _block_dots1(packed, w0, q, q0, q_stride, n_b, sums):
            for b in range(n_b):
                sums[b] = i2s_dot1(packed, w0 + b * 64, q, q0 + b * QK_K, q_stride, 2)
    else:
        from .simd_blocks import i2s_block_dots1 as _block_dots1, i2s_block_scaled_dots4 as _block_scaled_dots4

    @njit(**JIT)
    def _tq_rows(packed, q, qsums, d_x, block_scales, out, m_lo, m_hi):
        """Rows [m_lo, m_hi) of out, a row per kernels.simd_blocks call (4 tokens per weight unpack): each
        (row, 256-block) integer dot as sum(code * q) - sum(q), the blocks' float terms added in block order
        as tq_matmul_q8k_plain does."""
        T, K = q.shape
        row_bytes = K // 4
        n_b = K // QK_K
        qf = q.reshape(-1)  # i8[T*K]
        scales = block_scales.reshape(-1)  # f32[M*n_b]
        q_sums = np.empty(4 * n_b, np.int32)  # a tile's block sums and Q8_K scales, block-major: [n_b, 4]
        d_x4 = np.empty(4 * n_b, np.float32)
        sums = np.empty(n_b, np.int32)
        t = 0
        while t + 4 <= T:
            for b in range(n_b):
                for j in range(4):
                    q_sums[4 * b + j] = qsums[t + j, b]
                    d_x4[4 * b + j] = d_x[t + j, b]
            for m in range(m_lo, m_hi):
                a0, a1, a2, a3 = _block_scaled_dots4(packed, m * row_bytes, qf, t * K, K, n_b, q_sums, d_x4, scales,
                                                     m * n_b)
                out[t, m], out[t + 1, m], out[t + 2, m], out[t + 3, m] = a0, a1, a2, a3
            t += 4
        while t < T:
            for m in range(m_lo, m_hi):
                _block_dots1(packed, m * row_bytes, qf, t * K, K, n_b, sums)
                a0 = np.float32(0.0)
                for b in range(n_b):
                    a0 += np.float32(sums[b] - qsums[t, b]) * np.float32(d_x[t, b] * block_scales[m, b])
                out[t, m] = a0
            t += 1
else:
    _tq_rows = _tq_rows_plain


@njit(**JIT_PARALLEL)
def tq_matmul_q8k(packed, q, d_x, block_scales, out, n_threads):
    """Same contract and results as tq_matmul_q8k_plain: SIMD dots where the host has AVX2, rows in tasks of
    up to ROWS_PER_TASK (kernels.tasks.balanced_rows_per_task)."""
    T, K = q.shape
    M = out.shape[1]
    qsums = np.empty((T, K // QK_K), np.int32)
    _block_sums(q, qsums)
    r = balanced_rows_per_task(ROWS_PER_TASK, M, 0, 0, n_threads)
    for task in prange(n_tasks3(r, M, 0, 0)):
        _tq_rows(packed, q, qsums, d_x, block_scales, out, task * r, min(M, task * r + r))


@njit(**JIT_PARALLEL)
def tq_matmul_q8k_multi(p0, p1, p2, q, d_x, s0, s1, s2, o0, o1, o2, n_threads):
    """Up to three block-scaled weights on the same Q8_K activations (q/k/v, gate/up) in one parallel region:
    o_i = W_i q as tq_matmul_q8k computes it (p2/s2/o2 may be empty: u8[0], f32[0, K/256], f32[T, 0])."""
    T, K = q.shape
    M0, M1, M2 = o0.shape[1], o1.shape[1], o2.shape[1]
    qsums = np.empty((T, K // QK_K), np.int32)
    _block_sums(q, qsums)
    r = balanced_rows_per_task(ROWS_PER_TASK, M0, M1, M2, n_threads)
    for task in prange(n_tasks3(r, M0, M1, M2)):
        w, lo, hi = task3(task, r, M0, M1, M2)
        if w == 0:
            _tq_rows(p0, q, qsums, d_x, s0, o0, lo, hi)
        elif w == 1:
            _tq_rows(p1, q, qsums, d_x, s1, o1, lo, hi)
        else:
            _tq_rows(p2, q, qsums, d_x, s2, o2, lo, hi)
