"""Ternary x int8 matmul over I2_S-packed weights (the layout of bitnet.cpp's I2_S tensors).

Weights: uint8[M * K / 4]; row m is bytes [m*K/4, (m+1)*K/4); in each 32-byte block byte p holds the 2-bit
codes of values p, p+32, p+64, p+96 of that 128-value block at shifts 6, 4, 2, 0; weight = code - 1.
Exact integer accumulation: dot = sum(code * q) - sum(q); then y = float32(dot) / s_a * scale (float32).
"""
import numpy as np
from numba import njit, prange

from .config import JIT_PARALLEL


@njit(**JIT_PARALLEL)
def i2s_matmul(packed, q, act_scales, act_sums, scale, out):
    """packed: u8[M*K/4]; q: i8[T, K]; act_scales: f32[T]; act_sums: i32[T]; scale: f32 -> out: f32[T, M]."""
    T, K = q.shape
    M = out.shape[1]
    row_bytes = K // 4
    n_blocks = K // 128
    for m in prange(M):
        base = m * row_bytes
        for t in range(T):
            acc = 0
            for b in range(n_blocks):
                o = base + b * 32
                k0 = b * 128
                blk = 0
                for p in range(32):
                    byte = np.int32(packed[o + p])
                    blk += (((byte >> 6) & 3) * np.int32(q[t, k0 + p])
                            + ((byte >> 4) & 3) * np.int32(q[t, k0 + 32 + p])
                            + ((byte >> 2) & 3) * np.int32(q[t, k0 + 64 + p])
                            + (byte & 3) * np.int32(q[t, k0 + 96 + p]))
                acc += blk
            dot = acc - act_sums[t]
            out[t, m] = np.float32(dot) / act_scales[t] * scale


@njit(**JIT_PARALLEL)
def i2s_matmul_block_scaled(packed, q, act_scales, act_sums, block_scales, out):
    """Like i2s_matmul with one weight scale per (row, 256-value block) (TQ1_0/TQ2_0 weights):
    block_scales: f32[M, K/256]; y = sum_b float32(dot_b) * block_scale / s_a.
    act_sums is unused (kept for a uniform signature); per-block sums are computed inline."""
    T, K = q.shape
    M = out.shape[1]
    row_bytes = K // 4
    n_blocks = K // 128
    for m in prange(M):
        base = m * row_bytes
        for t in range(T):
            acc = np.float32(0.0)
            dot = 0
            for b in range(n_blocks):
                o = base + b * 32
                k0 = b * 128
                for p in range(32):
                    byte = np.int32(packed[o + p])
                    dot += ((((byte >> 6) & 3) - 1) * np.int32(q[t, k0 + p])
                            + (((byte >> 4) & 3) - 1) * np.int32(q[t, k0 + 32 + p])
                            + (((byte >> 2) & 3) - 1) * np.int32(q[t, k0 + 64 + p])
                            + ((byte & 3) - 1) * np.int32(q[t, k0 + 96 + p]))
                if b % 2 == 1:
                    acc += np.float32(dot) * block_scales[m, b // 2]
                    dot = 0
            out[t, m] = acc / act_scales[t]
