"""RMSNorm as ggml computes it: sum of float32 squares in double, mean rounded to float32,
scale = 1/sqrtf(mean + eps) in float32, y = (x * scale) * weight in float32.

`rms_norm` runs on one thread (a parallel region costs more than a few rows); `rms_norm_parallel` splits rows
over threads for large batches. The double sum is the reference's sequential one, computed as eight partial
sums where their rounding provably cannot change the float32 mean (`_mean_square`)."""
import math

import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL


@njit(**JIT)
def _sequential_sum(x, t):
    """The reference's sum: float32 squares of x[t] added in float64, one after the other."""
    total = 0.0
    for i in range(x.shape[1]):
        v = x[t, i]
        total += np.float64(v * v)
    return total


@njit(**JIT)
def _mean_square(x, t):
    """float32(sequential float64 sum of x[t]'s float32 squares / N), the reference's mean, from eight partial sums
    side by side (a lone chain of float64 adds is bound by their latency: 10 us for 6912 values, ~1 us this
    way). Both sums lie within (N + 8) 2^-52 of the exact one, so where both ends of twice that interval round
    to the same float32 mean the reference's does too; else (within ~1e-11 of a rounding boundary) the
    sequential sum decides."""
    N = x.shape[1]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n8 = N // 8 * 8
    for i in range(0, n8, 8):
        v0, v1, v2, v3 = x[t, i], x[t, i + 1], x[t, i + 2], x[t, i + 3]
        v4, v5, v6, v7 = x[t, i + 4], x[t, i + 5], x[t, i + 6], x[t, i + 7]
        s0 += np.float64(v0 * v0)
        s1 += np.float64(v1 * v1)
        s2 += np.float64(v2 * v2)
        s3 += np.float64(v3 * v3)
        s4 += np.float64(v4 * v4)
        s5 += np.float64(v5 * v5)
        s6 += np.float64(v6 * v6)
        s7 += np.float64(v7 * v7)
    for i in range(n8, N):
        v = x[t, i]
        s0 += np.float64(v * v)
    total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    margin = total * (N + 8) * 2.0 ** -51
    lo, hi = np.float32((total - margin) / N), np.float32((total + margin) / N)
    if lo == hi:  # False for inf / NaN sums: the sequential sum gives the reference's inf or NaN
        return lo
    return np.float32(_sequential_sum(x, t) / N)


@njit(**JIT)
def _inv_rms(mean, eps):
    """float32 mean of squares -> 1 / sqrt(mean + eps), in float32 as ggml rounds it."""
    return np.float32(1.0) / np.float32(math.sqrt(np.float32(mean + np.float32(eps))))


@njit(**JIT)
def _rms_row(x, weight, eps, out, t):
    scale = _inv_rms(_mean_square(x, t), eps)
    for i in range(x.shape[1]):
        out[t, i] = (x[t, i] * scale) * weight[i]


@njit(**JIT)
def rms_norm(x, weight, eps, out):
    """x: f32[T, N]; weight: f32[N]; eps: float -> out: f32[T, N] (may alias x)."""
    for t in range(x.shape[0]):
        _rms_row(x, weight, eps, out, t)


@njit(**JIT_PARALLEL)
def rms_norm_parallel(x, weight, eps, out):
    """Same as rms_norm, rows split over threads."""
    for t in prange(x.shape[0]):
        _rms_row(x, weight, eps, out, t)
