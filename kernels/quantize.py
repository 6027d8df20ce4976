"""Per-token int8 absmax activation quantization (bitnet.cpp's arithmetic).

For each row x of length K: amax = max(floor, max|x|) in double, s = float32(127 / amax),
q = clamp(round_half_even(x * s), -128, 127) computed in float32, sum_q = sum(q).
I2_S uses floor = 1e-5; TL2 uses no floor (floor = 0; an all-zero row then gives q = 0, s = 1).
"""
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_MAX, JIT_PARALLEL


@njit(**JIT_MAX)
def _abs_max(x, t):
    """max |x[t, :]| as float64 (the float32 maximum, converted exactly). A maximum does not depend on the
    order of comparisons, so it may vectorize (JIT_MAX); NaNs are not expected."""
    best = np.float32(0.0)
    for k in range(x.shape[1]):
        a = abs(x[t, k])
        if a > best:
            best = a
    return np.float64(best)


@njit(**JIT)
def _quantize_row(x, floor, q, scales, sums, t):
    K = x.shape[1]
    amax = _abs_max(x, t)
    if amax < floor:
        amax = floor
    s = np.float32(127.0 / amax) if amax > 0.0 else np.float32(1.0)
    total = 0
    for k in range(K):
        v = np.rint(x[t, k] * s)
        if v > 127.0:
            v = 127.0
        elif v < -128.0:
            v = -128.0
        iv = np.int32(v)
        q[t, k] = iv
        total += iv
    scales[t] = s
    sums[t] = total


@njit(**JIT)
def quantize_rows_i8(x, floor, q, scales, sums):
    """x: f32[T, K] -> q: i8[T, K], scales: f32[T] (s_a), sums: i32[T] (sum of q). One thread."""
    for t in range(x.shape[0]):
        _quantize_row(x, floor, q, scales, sums, t)


@njit(**JIT_PARALLEL)
def quantize_rows_i8_parallel(x, floor, q, scales, sums):
    """Same as quantize_rows_i8, rows split over threads."""
    for t in prange(x.shape[0]):
        _quantize_row(x, floor, q, scales, sums, t)
