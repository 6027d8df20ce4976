"""RMSNorm as ggml computes it: sum of float32 squares in double, mean rounded to float32,
scale = 1/sqrtf(mean + eps) in float32, y = (x * scale) * weight in float32.

`rms_norm` runs on one thread (a parallel region costs more than a few rows); `rms_norm_parallel` splits rows
over threads for large batches."""
import math

import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL


@njit(**JIT)
def _rms_row(x, weight, eps, out, t):
    N = x.shape[1]
    total = 0.0
    for i in range(N):
        v = x[t, i]
        total += np.float64(v * v)
    mean = np.float32(total / N)
    scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(mean + np.float32(eps))))
    for i in range(N):
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
