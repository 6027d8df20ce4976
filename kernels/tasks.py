"""Row tasks of the fused matmuls (q/k/v, gate/up): two or three weights on the same activations in one parallel
region, each weight's rows cut into tasks of `rows_per_task`, weight 0's tasks first, then 1's, then 2's."""
from numba import njit

from .config import JIT


@njit(**JIT)
def n_tasks3(rows_per_task, m0, m1, m2):
    """Number of tasks over weights of m0, m1, m2 rows (m2 may be 0)."""
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
