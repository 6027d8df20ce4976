"""Ternary x int8 matmul by table lookup (T-MAC style) over the same I2_S-packed weights.

Each weight byte of an I2_S block holds four 2-bit codes: values p, p+32 (high nibble) and p+64, p+96 (low
nibble). Per token, the activation side is turned into tables: for every block b, byte position p and nibble
half, 16 int16 entries `c0 * q[k_a] + c1 * q[k_b]` over all code pairs (c0, c1) in 0..3 (3 never occurs).
A weight byte then contributes `tab[hi nibble] + tab[lo nibble]`: two lookups replace four multiply-adds.
Result: sum(code * q), exact in int32; y = float32(dot - sum(q)) / s_a * scale, as i2s_matmul.

tables: i16[T, K/128 * 32 * 2 * 16] (= 8 entries per activation value: 40 KB per token for K = 2560),
built once per call and shared by all M rows. The last argument `n_threads` sizes the row tasks, as in
kernels.ternary_matmul.
"""
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL
from .tasks import balanced_rows_per_task, n_tasks3, task3

ROWS_PER_TASK = 32
TABLE_PER_BLOCK = 32 * 2 * 16  # entries per 128-value block


@njit(**JIT)
def build_tables(q, tables):
    """q: i8[T, K] -> tables: i16[T, K/128 * 1024]; entry ((b*32 + p)*2 + half)*16 + (c0*4 + c1)."""
    T, K = q.shape
    for t in range(T):
        for b in range(K // 128):
            k0 = b * 128
            for p in range(32):
                for half in range(2):
                    a0 = np.int16(q[t, k0 + 64 * half + p])
                    a1 = np.int16(q[t, k0 + 64 * half + 32 + p])
                    base = ((b * 32 + p) * 2 + half) * 16
                    for c0 in range(4):
                        for c1 in range(4):
                            tables[t, base + c0 * 4 + c1] = np.int16(c0) * a0 + np.int16(c1) * a1


@njit(**JIT)
def _rows_lut(packed, tables, K, act_scales, act_sums, scale, out, m_lo, m_hi):
    T = tables.shape[0]
    row_bytes = K // 4
    n_bytes = row_bytes
    for m in range(m_lo, m_hi):
        base = m * row_bytes
        for t in range(T):
            acc = 0
            for i in range(n_bytes):
                byte = np.int32(packed[base + i])
                e = i * 32  # (b*32 + p) * 2 * 16 with i = b*32 + p
                acc += np.int32(tables[t, e + (byte >> 4)]) + np.int32(tables[t, e + 16 + (byte & 15)])
            out[t, m] = np.float32(acc - act_sums[t]) / act_scales[t] * scale


@njit(**JIT_PARALLEL)
def lut_matmul(packed, q, act_scales, act_sums, scale, out, n_threads):
    """packed: u8[M*K/4] (I2_S); q: i8[T, K]; act_scales: f32[T]; act_sums: i32[T]; scale: f32
    -> out: f32[T, M]. Same result as i2s_matmul."""
    T, K = q.shape
    M = out.shape[1]
    tables = np.empty((T, K // 128 * TABLE_PER_BLOCK), np.int16)
    build_tables(q, tables)
    r = balanced_rows_per_task(ROWS_PER_TASK, M, 0, 0, n_threads)
    for task in prange(n_tasks3(r, M, 0, 0)):
        _rows_lut(packed, tables, K, act_scales, act_sums, scale, out, task * r, min(M, task * r + r))


@njit(**JIT_PARALLEL)
def lut_matmul_multi(p0, p1, p2, q, act_scales, act_sums, s0, s1, s2, o0, o1, o2, n_threads):
    """Up to three weights on the same activations, one table build, one parallel region (as
    i2s_matmul_multi)."""
    T, K = q.shape
    tables = np.empty((T, K // 128 * TABLE_PER_BLOCK), np.int16)
    build_tables(q, tables)
    M0, M1, M2 = o0.shape[1], o1.shape[1], o2.shape[1]
    r = balanced_rows_per_task(ROWS_PER_TASK, M0, M1, M2, n_threads)
    for task in prange(n_tasks3(r, M0, M1, M2)):
        w, lo, hi = task3(task, r, M0, M1, M2)
        if w == 0:
            _rows_lut(p0, tables, K, act_scales, act_sums, s0, o0, lo, hi)
        elif w == 1:
            _rows_lut(p1, tables, K, act_scales, act_sums, s1, o1, lo, hi)
        else:
            _rows_lut(p2, tables, K, act_scales, act_sums, s2, o2, lo, hi)
