"""The screened head's last steps for one logits row, compiled: from the bounds of kernels.head_screen to the
exact float16 logits of the rows that can reach the top k (bitnet_py.screened_head).

`select_rows` picks the candidate rows: every row whose upper bound reaches the k-th largest lower bound (the rows
a sampler will move, `keep`, ranked by their exact values instead), plus `keep`. `exact_rows` reads those rows of
the f16 head (from the file with pread, so that they do not join the resident set, or from the map) and writes
their logits with f16_matmul's one-token arithmetic (kernels.dense.f16_row_dot: the same bits), -inf
elsewhere.

Why compiled: the same steps in numpy (max, compare, flatnonzero, a preadv per row, a fill) took 1.9 ms of a
2B-4T greedy step (46 ms) on the 2-vCPU Intel Xeon, several times their time in isolation (they run right after
the screen has streamed 0.33 GB through the caches); compiled, 0.7-1.0 ms, nearly all of it the ~34 reads.
Greedy decode 1.019x (6 of 8 rounds, `scripts/bench_ab.py -m out/2b4t-i2s.gguf --against 587eef7 -t 2 --rounds 8
-n 32 -p 0 --top-k 1 --same-top-k`). On that VM a row of the page cache not read for a while costs 11-40 us
(fresh prompts: 1.4-1.5 ms a step), one read again soon after 1.2 us; the reads split over two threads
(a parallel loop) took no less.
"""
import numpy as np
from numba import njit

from .config import JIT
from .pointers import pread
from .simd import HAVE_F16C

_SIGN = np.int32(0x7FFFFFFF)
BLOCK = 64  # rows whose upper bounds are compared at once before any is stored


@njit(**JIT)
def _max_f32(values):
    """max of f32[M] (M >= 1, no NaNs) through the order-preserving int32 keys (an integer max vectorizes; the float
    compare-and-select loop stays scalar without fastmath)."""
    bits = values.view(np.int32)
    best = np.int32(-2 ** 31)
    for i in range(bits.shape[0]):
        b = bits[i]
        best = max(best, b ^ ((b >> 31) & _SIGN))
    return np.array([best ^ ((best >> 31) & _SIGN)], np.int32).view(np.float32)[0]


@njit(**JIT)
def _sift_down(heap, i):
    k = heap.shape[0]
    while True:
        c = 2 * i + 1
        if c >= k:
            return
        if c + 1 < k and heap[c + 1] < heap[c]:
            c += 1
        if heap[i] <= heap[c]:
            return
        heap[i], heap[c] = heap[c], heap[i]
        i = c


@njit(**JIT)
def kth_largest(values, k):
    """values: f32[M] (no NaNs), 1 <= k <= M -> the k-th largest, duplicates counted (np.partition's
    values[M - k] after partitioning): the root of a min-heap of the k largest seen."""
    if k == 1:
        return _max_f32(values)
    heap = values[:k].copy()
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(heap, i)
    for i in range(k, values.shape[0]):
        if values[i] > heap[0]:
            heap[0] = values[i]
            _sift_down(heap, 0)
    return heap[0]


@njit(**JIT)
def select_rows(lower, upper, k, keep, ids):
    """lower, upper: f32[M] bounds of one logits row (lower is overwritten at keep); keep: i64[N] unique ids;
    1 <= k <= M - N -> n, ids[:n] (i64[>= M]): the rows whose upper bound reaches the k-th largest lower bound
    of the rows outside keep, ascending, then the ids of keep not among them. Every other row is below k rows."""
    M = lower.shape[0]
    for j in keep:
        lower[j] = -np.inf  # ranked from their exact values: the sampler may move them
    cut = kth_largest(lower, k)
    n = 0
    for m0 in range(0, M, BLOCK):
        m1 = min(M, m0 + BLOCK)
        hit = False
        for m in range(m0, m1):  # branch-free: vectorizes; few blocks hold a candidate
            hit |= upper[m] >= cut
        if hit:
            for m in range(m0, m1):
                ids[n] = m
                n += upper[m] >= cut
    for j in keep:
        if not upper[j] >= cut:
            ids[n] = j
            n += 1
    return n


@njit(**JIT)
def read_row(fd, offset, out):
    """out (C-contiguous) <- out.nbytes bytes of the file at offset; -> False on a read error or the file's end."""
    done, size = 0, out.nbytes
    address = np.uint64(out.ctypes.data)
    while done < size:
        got = pread(np.int32(fd), address + np.uint64(done), np.uint64(size - done), offset + done)
        if got <= 0:
            return False
        done += got
    return True


if HAVE_F16C:  # the screened head's hosts (bitnet_py.screened_head.screening_possible)
    from .dense import f16_row_dot

    @njit(**JIT)
    def exact_rows(w_bits, fd, offset, ids, y, t, rows, out):
        """w_bits: u16[M, K] the f16 head (its map); ids: i64[n] rows; y: f32[T, K] (f16-rounded activations),
        token t -> out: f32[M], f16_matmul's logit of token t at ids, -inf elsewhere. The rows come from the file
        (fd >= 0: the head's bytes start at `offset`) into rows: u16[>= n, K], or from w_bits where fd < 0.
        -> -1, or the first id whose read failed (out is then left unwritten)."""
        K = w_bits.shape[1]
        n = ids.shape[0]
        for i in range(n):
            if fd >= 0:
                if not read_row(fd, offset + ids[i] * 2 * K, rows[i]):
                    return ids[i]
            else:
                rows[i] = w_bits[ids[i]]
        out[:] = -np.inf
        for i in range(n):
            out[ids[i]] = f16_row_dot(rows, i, y, t)
        return -1
