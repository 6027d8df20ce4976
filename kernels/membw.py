"""Memory-bandwidth probe: read a large buffer once with all threads (what a decode step does with weights)."""
import numpy as np
from numba import njit, prange

from .config import JIT_REDUCE_PARALLEL

MIN_CHUNK = 1 << 12  # u64 words per task at least (32 KiB)
TASKS_PER_THREAD = 4  # tasks per thread for each buffer, so that every thread reads even from a small matrix


def chunk_words(n_words: int, n_threads: int) -> int:
    """Words per task for reading n_words with n_threads: about TASKS_PER_THREAD tasks per thread. One fixed
    512 KiB chunk left threads idle on many-core hosts (a 1.6 MB matrix was 4 tasks for 16 threads)."""
    return max(MIN_CHUNK, -(-n_words // (TASKS_PER_THREAD * max(1, n_threads))))


@njit(**JIT_REDUCE_PARALLEL)
def read_sum(words, chunk, partial):
    """words: u64[N]; chunk: words per task -> partial: u64[ceil(N / chunk)] (wrapping sum of each task's words,
    so the reads cannot be skipped); returns N*8 (bytes read)."""
    n = words.shape[0]
    for task in prange(partial.shape[0]):
        # a view with a 0-based loop vectorizes; words[task * chunk + i] with a run-time chunk did not (half speed)
        part = words[task * chunk:min(n, (task + 1) * chunk)]
        acc = np.uint64(0)
        for i in range(part.shape[0]):
            acc += part[i]
        partial[task] = acc
    return n * 8
