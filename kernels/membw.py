"""Memory-bandwidth probe: read a large buffer once with all threads (what a decode step does with weights)."""
import numpy as np
from numba import njit, prange

from .config import JIT_REDUCE_PARALLEL

CHUNK = 1 << 16  # u64 words per task (512 KiB)


@njit(**JIT_REDUCE_PARALLEL)
def read_sum(words, partial):
    """words: u64[N] -> partial: u64[n_tasks] (wrapping sums, so the reads cannot be skipped); returns N*8."""
    n = words.shape[0]
    n_tasks = partial.shape[0]
    for task in prange(n_tasks):
        acc = np.uint64(0)
        for i in range(task * CHUNK, min(n, (task + 1) * CHUNK)):
            acc += words[i]
        partial[task] = acc
    return n * 8
