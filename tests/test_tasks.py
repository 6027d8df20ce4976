"""kernels.tasks: the row tasks of the ternary matmuls, sized so no thread of a many-core host waits on another's
extra task (kernels.ternary_matmul, q8k and lut_matmul split their rows this way; test_kernels and test_q8k
check their results for shapes whose task sizes differ)."""
import numpy as np
import pytest

from kernels.tasks import MIN_ROWS_PER_TASK, balanced_rows_per_task, busiest_thread_rows, n_tasks3, task3

# 2B-4T: q/k/v, wo, gate/up, down; Llama3-8B: q/k/v, gate/up; small and ragged shapes
SHAPES = [(2560, 640, 640), (2560, 0, 0), (6912, 6912, 0), (6912, 0, 0), (4096, 1024, 1024), (14336, 14336, 0),
          (35, 0, 0), (33, 5, 70), (1, 0, 0), (100, 3, 0)]


def _busiest_reference(r, ms, n_threads):
    """numpy: the most tasks any thread gets when the task list is cut into n_threads runs (lengths differing by at
    most one), times the task size."""
    n = sum(len(range(0, m, r)) for m in ms)
    return max(len(run) for run in np.array_split(np.arange(n), n_threads)) * r


@pytest.mark.parametrize("ms", SHAPES)
@pytest.mark.parametrize("n_threads", [1, 2, 3, 7, 16, 45, 90, 176, 180])
def test_balanced_rows_per_task_is_the_largest_size_with_the_fewest_busiest_thread_rows(ms, n_threads):
    busiest = {r: _busiest_reference(r, ms, n_threads) for r in range(MIN_ROWS_PER_TASK, 33)}
    for r in busiest:
        assert busiest_thread_rows(r, *ms, n_threads) == busiest[r]
    fewest = min(busiest.values())
    assert balanced_rows_per_task(32, *ms, n_threads) == max(r for r, b in busiest.items() if b == fewest)


@pytest.mark.parametrize("n_threads", [1, 2, 4, 8])
def test_2b4t_shapes_keep_32_rows_per_task_up_to_8_threads(n_threads):
    for ms in SHAPES[:4]:
        assert balanced_rows_per_task(32, *ms, n_threads) == 32


def test_many_threads_get_smaller_tasks_and_the_busiest_thread_fewer_rows():
    # 2B-4T's wo at 180 threads: 80 tasks of 32 rows left 100 threads idle
    r = balanced_rows_per_task(32, 2560, 0, 0, 180)
    assert r < 32 and busiest_thread_rows(r, 2560, 0, 0, 180) <= 16 < busiest_thread_rows(32, 2560, 0, 0, 180)


@pytest.mark.parametrize("ms", SHAPES)
@pytest.mark.parametrize("r", [MIN_ROWS_PER_TASK, 11, 20, 32])
def test_tasks_cover_every_row_of_every_weight_once(ms, r):
    seen = [np.zeros(m, int) for m in ms]
    for task in range(n_tasks3(r, *ms)):
        w, lo, hi = task3(task, r, *ms)
        assert 0 < hi - lo <= r
        seen[w][lo:hi] += 1
    assert all((s == 1).all() for s in seen)
