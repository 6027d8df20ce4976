"""Row tasks of the ternary matmuls: each weight's rows cut into tasks of `rows_per_task`; the fused matmuls
(q/k/v, gate/up) run two or three weights on the same activations in one parallel region, weight 0's tasks first,
then 1's, then 2's.

Numba's parallel loops hand each thread one equal run of the task range (a static split), so a call takes as long
as its busiest thread's rows. A fixed 32 rows per task fits a few threads, but a 2B-4T wo or ffn_down (2560 rows:
80 tasks) would leave 10 of 90 threads idle and 100 of 180, each busy one doing 32 rows where 15-29 would do.
`balanced_rows_per_task` picks, from `most` down to MIN_ROWS_PER_TASK, the task size whose busiest thread gets
the fewest rows (the largest such size: fewer, longer tasks); at 2B-4T's shapes and 1-8 threads that is `most`.

Even split, uneven speeds: a VM's cores do not stream memory at the same rate from one moment to the next, so
with a static split one thread waits at the end of every region for the other (on the 2-vCPU Intel Xeon VM, a
C probe of the 210 base-3 matmuls of a 2B-4T token measured 6-19 % of the slower thread's time idle in the
faster one, by the quarter hour, and which thread was slower changed). `task_ranges` / `next_task` let a loop
over the threads hand out the same tasks in the same static runs, front first, and let a thread whose run is
done take the back half of the largest run left (one compare-and-swap per task, kernels.atomics).
"""
import numpy as np
from numba import njit

from .atomics import atomic_load, atomic_store, compare_and_swap
from .config import JIT

MIN_ROWS_PER_TASK = 8  # smaller tasks would take at most a few rows off the busiest thread (2B-4T, up to 180 threads)


@njit(**JIT)
def n_tasks3(rows_per_task, m0, m1, m2):
    """Number of tasks over weights of m0, m1, m2 rows (m1, m2 may be 0)."""
    r = rows_per_task
    return (m0 + r - 1) // r + (m1 + r - 1) // r + (m2 + r - 1) // r


@njit(**JIT)
def task3(task, rows_per_task, m0, m1, m2):
    """-> (weight 0, 1 or 2, first row, end row) of one task."""
    r = rows_per_task
    n0 = (m0 + r - 1) // r
    n1 = (m1 + r - 1) // r
    if task < n0:
        return 0, task * r, min(m0, task * r + r)
    if task < n0 + n1:
        lo = (task - n0) * r
        return 1, lo, min(m1, lo + r)
    lo = (task - n0 - n1) * r
    return 2, lo, min(m2, lo + r)


@njit(**JIT)
def busiest_thread_rows(rows_per_task, m0, m1, m2, n_threads):
    """Rows of the busiest of n_threads threads when the tasks are cut into n_threads runs whose lengths differ by
    at most one: its task count times rows_per_task (where a weight's last task is short, an upper bound)."""
    n = n_tasks3(rows_per_task, m0, m1, m2)
    return (n + n_threads - 1) // n_threads * rows_per_task


@njit(**JIT)
def balanced_rows_per_task(most, m0, m1, m2, n_threads):
    """Rows per task, at most `most` (and at least MIN_ROWS_PER_TASK where `most` is larger), for weights of m0,
    m1, m2 rows over n_threads: the largest size whose busiest thread gets the fewest rows; `most` where n_threads
    is 0 (not given). The caller passes numba's thread count: read inside a kernel, it would keep the kernel out of
    the on-disk cache."""
    if n_threads <= 0:
        return most
    best = most
    best_rows = busiest_thread_rows(most, m0, m1, m2, n_threads)
    for r in range(most - 1, MIN_ROWS_PER_TASK - 1, -1):
        rows = busiest_thread_rows(r, m0, m1, m2, n_threads)
        if rows < best_rows:
            best, best_rows = r, rows
    return best


RANGE_STRIDE = 8  # int64 words between two threads' ranges (one 64-byte line each)
_LOW = (1 << 32) - 1


@njit(**JIT)
def worker_count(n_tasks, n_threads):
    """Iterations of a loop over `next_task` workers: numba's thread count (n_threads, passed by the caller), at
    most one per task; where the caller passes 0 (not known), 64: each iteration runs until no task is left, so
    the threads' first iterations share the work and their later ones find none."""
    return max(1, min(n_threads if n_threads > 0 else 64, n_tasks))


@njit(**JIT)
def task_ranges(n_tasks, n_threads):
    """-> i64[n_threads * RANGE_STRIDE]: thread t's tasks [t n / T, (t + 1) n / T) as front | end << 32 (the
    static split of a parallel loop), for `next_task`."""
    ranges = np.zeros(n_threads * RANGE_STRIDE, np.int64)
    set_task_ranges(ranges, n_tasks)
    return ranges


@njit(**JIT)
def set_task_ranges(ranges, n_tasks):
    """task_ranges into ranges: i64[n_threads * RANGE_STRIDE], in place. Only each thread's first word is read;
    the padding words are left as they are (a caller filling hundreds of ranges per step skips zeroing them)."""
    n_threads = ranges.shape[0] // RANGE_STRIDE
    for t in range(n_threads):
        ranges[t * RANGE_STRIDE] = (t * n_tasks // n_threads) | ((t + 1) * n_tasks // n_threads) << 32


@njit(**JIT)
def next_task(ranges, t):
    """The next task for thread t (`task_ranges`): the front of its own range; when that is empty, the back half
    of the largest range left (or its last task), which becomes t's range; -1 when no task is left. Each task is
    returned exactly once, whichever threads run and when (a thread that never starts has its range taken)."""
    n_threads = ranges.shape[0] // RANGE_STRIDE
    while True:
        w = atomic_load(ranges, t * RANGE_STRIDE)
        front, end = w & _LOW, w >> 32
        if front < end:
            if compare_and_swap(ranges, t * RANGE_STRIDE, w, (front + 1) | (end << 32)):
                return front
            continue
        victim, most = -1, 0
        for j in range(n_threads):
            x = atomic_load(ranges, j * RANGE_STRIDE)
            if (x >> 32) - (x & _LOW) > most:
                victim, most = j, (x >> 32) - (x & _LOW)
        if victim < 0:
            return -1
        x = atomic_load(ranges, victim * RANGE_STRIDE)
        front, end = x & _LOW, x >> 32
        if front >= end:
            continue
        mid = front + (end - front) // 2  # the victim keeps [front, mid), this thread takes [mid, end)
        if compare_and_swap(ranges, victim * RANGE_STRIDE, x, front | (mid << 32)):
            atomic_store(ranges, t * RANGE_STRIDE, (mid + 1) | (end << 32))
            return mid
