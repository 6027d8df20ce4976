"""RMSNorm as ggml computes it: sum of float32 squares in double, mean rounded to float32,
scale = 1/sqrtf(mean + eps) in float32, y = (x * scale) * weight in float32.

`rms_norm` runs on one thread (a parallel region costs more than a few rows); `rms_norm_parallel` splits rows
over threads for large batches, four rows per task: each row's double sum is one sequential chain (the
reference order), so a lone row is bound by the add latency; four independent chains side by side are not."""
import math

import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL


ROWS_PER_TASK = 4


@njit(**JIT)
def _inv_rms(total, n, eps):
    """Double sum of squares of n values -> 1 / sqrt(mean + eps), in float32 as ggml rounds it."""
    mean = np.float32(total / n)
    return np.float32(1.0) / np.float32(math.sqrt(np.float32(mean + np.float32(eps))))


@njit(**JIT)
def _rms_row(x, weight, eps, out, t):
    N = x.shape[1]
    total = 0.0
    for i in range(N):
        v = x[t, i]
        total += np.float64(v * v)
    scale = _inv_rms(total, N, eps)
    for i in range(N):
        out[t, i] = (x[t, i] * scale) * weight[i]


@njit(**JIT)
def _rms_rows4(x, weight, eps, out, t):
    """Rows t .. t+3, their four sums interleaved (each in the same order as `_rms_row`)."""
    N = x.shape[1]
    s0 = s1 = s2 = s3 = 0.0
    for i in range(N):
        v0, v1, v2, v3 = x[t, i], x[t + 1, i], x[t + 2, i], x[t + 3, i]
        s0 += np.float64(v0 * v0)
        s1 += np.float64(v1 * v1)
        s2 += np.float64(v2 * v2)
        s3 += np.float64(v3 * v3)
    totals = (s0, s1, s2, s3)
    for r in range(4):
        scale = _inv_rms(totals[r], N, eps)
        for i in range(N):
            out[t + r, i] = (x[t + r, i] * scale) * weight[i]


@njit(**JIT)
def rms_norm(x, weight, eps, out):
    """x: f32[T, N]; weight: f32[N]; eps: float -> out: f32[T, N] (may alias x)."""
    for t in range(x.shape[0]):
        _rms_row(x, weight, eps, out, t)


@njit(**JIT_PARALLEL)
def rms_norm_parallel(x, weight, eps, out):
    """Same as rms_norm, rows split over threads in groups of ROWS_PER_TASK."""
    T = x.shape[0]
    for task in prange((T + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        t = task * ROWS_PER_TASK
        if t + ROWS_PER_TASK <= T:
            _rms_rows4(x, weight, eps, out, t)
        else:
            for r in range(t, T):
                _rms_row(x, weight, eps, out, r)
