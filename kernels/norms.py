"""RMSNorm as ggml computes it: sum of float32 squares in double, mean rounded to float32,
scale = 1/sqrtf(mean + eps) in float32, y = (x * scale) * weight in float32."""
import math

import numpy as np
from numba import njit, prange

from .config import JIT_PARALLEL


@njit(**JIT_PARALLEL)
def rms_norm(x, weight, eps, out):
    """x: f32[T, N]; weight: f32[N]; eps: float -> out: f32[T, N] (may alias x)."""
    T, N = x.shape
    for t in prange(T):
        total = 0.0
        for i in range(N):
            v = x[t, i]
            total += np.float64(v * v)
        mean = np.float32(total / N)
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(mean + np.float32(eps))))
        for i in range(N):
            out[t, i] = (x[t, i] * scale) * weight[i]
