"""Float matmuls with float16 weights (output heads, tied embeddings): y = W . f16(x), float32 accumulation.

The activation is rounded to float16 by the caller, as ggml does for f16 weights."""
import numpy as np
from numba import njit, prange

from .config import JIT_REDUCE_PARALLEL

_ROWS_PER_TASK = 64
_TWO_POW_112 = np.float32(2.0 ** 112)


@njit(**JIT_REDUCE_PARALLEL)
def f16_matmul(w_bits, x, out):
    """w_bits: u16[M, K] (float16 bits); x: f32[T, K] (f16-representable values) -> out: f32[T, M]."""
    M, K = w_bits.shape
    T = x.shape[0]
    n_tasks = (M + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        row_f = np.empty(K, dtype=np.float32)
        row_u = row_f.view(np.uint32)
        m_end = min(M, (task + 1) * _ROWS_PER_TASK)
        for m in range(task * _ROWS_PER_TASK, m_end):
            for k in range(K):
                h = np.uint32(w_bits[m, k])
                row_u[k] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
            for k in range(K):
                row_f[k] *= _TWO_POW_112  # exact: re-biases the exponent (normal and subnormal halves)
            for t in range(T):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += row_f[k] * x[t, k]
                out[t, m] = acc
