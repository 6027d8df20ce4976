"""Row tasks of the ternary matmuls: each weight's rows cut into tasks of `rows_per_task`; the fused matmuls
(q/k/v, gate/up) run two or three weights on the same activations in one parallel region, weight 0's tasks first,
then 1's, then 2's.

Numba's parallel loops hand each thread one equal run of the task range (a static split), so a call takes as long
as its busiest thread's rows. A fixed 32 rows per task fits a few threads, but a 2B-4T wo or ffn_down (2560 rows:
80 tasks) would leave 10 of 90 threads idle and 100 of 180, each busy one doing 32 rows where 15-29 would do.
`balanced_rows_per_task` picks, from `most` down to MIN_ROWS_PER_TASK, the task size whose busiest thread gets
the fewest rows (the largest such size: fewer, longer tasks); at 2B-4T's shapes and 1-8 threads that is `most`.
"""
from numba import njit

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
