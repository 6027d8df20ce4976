"""kernels.tasks: the row tasks of the ternary matmuls, sized so no thread of a many-core host waits on another's
extra task (kernels.ternary_matmul, q8k and lut_matmul split their rows this way; test_kernels and test_q8k
check their results for shapes whose task sizes differ)."""
import numpy as np
import pytest

from numba import njit, prange

from kernels.tasks import (MIN_ROWS_PER_TASK, RANGE_STRIDE, balanced_rows_per_task, busiest_thread_rows, n_tasks3,
                          next_task, set_task_ranges, task3, task_ranges, worker_count)

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


@njit
def _claims_in_turn(n_tasks, n_threads, turns):
    """One thread after another as `turns` (i64[]) names them, over and over (a thread that got -1 is skipped)
    -> i64[n_tasks, 2]: the order in which tasks were claimed (task, thread), -1 rows past the last."""
    ranges = task_ranges(n_tasks, n_threads)
    claims = np.full((n_tasks + 1, 2), -1, np.int64)
    done = np.zeros(n_threads, np.bool_)
    k = i = 0
    while not done[turns].all():
        t = turns[i % turns.shape[0]]
        i += 1
        if done[t]:
            continue
        task = next_task(ranges, t)
        if task < 0:
            done[t] = True
        else:
            claims[k, 0], claims[k, 1] = task, t
            k += 1
    return claims[:n_tasks]


@pytest.mark.parametrize("n_tasks, n_threads", [(1, 1), (5, 2), (80, 2), (432, 2), (7, 3), (240, 16), (80, 90)])
@pytest.mark.parametrize("turns", ["all", "one", "skewed"])
def test_next_task_hands_out_every_task_once(n_tasks, n_threads, turns):
    order = {"all": np.arange(n_threads), "one": np.array([n_threads - 1]),  # the others never start
             "skewed": np.array([0, 0, 0, n_threads - 1])}[turns]
    claims = _claims_in_turn(n_tasks, n_threads, order.astype(np.int64))
    assert sorted(claims[:, 0].tolist()) == list(range(n_tasks))
    static = [range(t * n_tasks // n_threads, (t + 1) * n_tasks // n_threads) for t in range(n_threads)]
    mine = {t: claims[claims[:, 1] == t, 0].tolist() for t in range(n_threads)}
    if turns == "all" and n_tasks >= n_threads:  # each starts at the front of its static run (none is empty)
        assert all(mine[t][0] == static[t][0] for t in range(n_threads) if len(static[t]))
        if n_tasks % n_threads == 0:  # in lockstep over equal runs nobody runs dry early: no stealing
            assert all(mine[t] == list(static[t]) for t in range(n_threads))
    else:  # the thread that runs most takes its whole static run first, then the others' (from their backs)
        t = order[0]
        assert mine[t][:len(static[t])] == list(static[t])


@njit(parallel=True)
def _claims_in_parallel(n_tasks, n_threads, spin):
    ranges = task_ranges(n_tasks, n_threads)
    claims = np.full((n_threads, n_tasks), -1, np.int64)
    work = np.zeros(n_threads)
    for t in prange(n_threads):
        k = 0
        task = next_task(ranges, t)
        while task >= 0:
            claims[t, k] = task
            k += 1
            for j in range(spin * (1 + 3 * t)):  # threads of different speeds
                work[t] += np.sqrt(j)
            task = next_task(ranges, t)
    return claims


@pytest.mark.parametrize("spin", [0, 2000])
def test_next_task_from_threads_at_once_hands_out_every_task_once(spin):
    import numba
    n_threads = numba.get_num_threads()
    for n_tasks in (1, 2, 80, 433):
        claims = _claims_in_parallel(n_tasks, n_threads, spin)
        got = claims[claims >= 0]
        assert sorted(got.tolist()) == list(range(n_tasks))


@pytest.mark.parametrize("n_tasks,n_threads", [(0, 3), (5, 2), (240, 180), (7, 7)])
def test_set_task_ranges_writes_each_threads_word_in_place(n_tasks, n_threads):
    """The in-place form (kernels.layer_region fills hundreds of ranges per step): the words next_task reads equal
    task_ranges', the padding keeps whatever was there, and the tasks handed out are each task once."""
    ranges = np.full(n_threads * RANGE_STRIDE, -7, np.int64)
    set_task_ranges(ranges, n_tasks)
    expected = task_ranges(n_tasks, n_threads)
    words = np.arange(n_threads) * RANGE_STRIDE
    np.testing.assert_array_equal(ranges[words], expected[words])
    padding = np.ones(ranges.size, bool)
    padding[words] = False
    assert (ranges[padding] == -7).all()
    handed = [task for t in range(n_threads) for task in iter(lambda t=t: next_task(ranges, t), -1)]
    assert sorted(handed) == list(range(n_tasks))


def test_worker_count_follows_the_threads_and_the_tasks():
    assert worker_count(432, 2) == 2 and worker_count(3, 90) == 3 and worker_count(0, 2) == 1
    assert worker_count(432, 0) == 64 and worker_count(5, 0) == 5  # thread count not given


def test_b3_matmul_without_a_thread_count_gives_the_same_results():
    """n_threads=0 (callers that do not size tasks: 64 workers over the threads there are): the same bits."""
    import numba
    from kernels import b3_matmul as B
    from kernels.b3_simd import HAVE_B3
    if not HAVE_B3 or numba.get_num_threads() < 2:
        pytest.skip("needs AVX-512 VBMI + VNNI and two threads")
    m, k = 64 * 16, 640
    rng = np.random.default_rng(3)
    packed = rng.integers(0, 243, m * k // 5, dtype=np.uint8)
    q = rng.integers(-127, 128, (1, k), dtype=np.int8)
    a, b = np.empty((1, m), np.float32), np.empty((1, m), np.float32)
    B.b3_matmul(packed, q, np.ones(1, np.float32), np.zeros(1, np.int32), np.float32(1), a, 0)
    B.b3_matmul(packed, q, np.ones(1, np.float32), np.zeros(1, np.int32), np.float32(1), b, 2)
    assert np.array_equal(a, b)
