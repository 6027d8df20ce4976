"""The screened head: exact top-k logits of a float16 output head, reading an int8 copy of it (half the bytes).

For row r of the head (f16 weights w, kept as q * s + e with q = int8 codes, s = the row scale, e the rounding
error, |e_j| <= s (1/2 + 2^-16)) and the f16-rounded activation y, the exact kernel's logit V_r is
f16_matmul's float32 dot. This module computes A_r = s * x_scale * (q . p), with p = y / x_scale rounded to int16
codes (up to 15 bits; the int8 x int16 dot is exact in int32), and a bound B_r with |V_r - A_r| <= B_r:
  V_r - w.y   <= (K + 8) 2^-24 ||w|| ||y||                       (float32 summation: w_term * ||y||)
  w.y - s q.y  = e.y <= ||e|| ||y_small|| + max|e| ||y_big||_1   (Cauchy-Schwarz on the inputs below
                                                                  OUTLIER * rms(y), the largest ones term by term)
  s q.y - A_r  = s q.(y - x_scale p) <= s ||q|| ||y - x_scale p||
plus 2^-20 |A_r| for the float64 products and an outward rounding to float32. The per-row norms come from
kernels.dense.quantize_f16_rows_i8 (ROW_* rows of `rows`), the per-token ones from quantize_activation_i16
(ACT_* columns of `act`). The caller then computes exact logits only for rows whose interval can reach the
top k (kernels.dense.f16_matmul on those rows).
"""
import numpy as np
from numba import get_num_threads, njit, prange

from .config import JIT, JIT_PARALLEL
from .simd import HAVE_AVX2, HAVE_AVX512
from .tasks import next_task, task_ranges, worker_count

ACT_MAX = 16383  # activation codes |p| <= 2^14 - 1, fewer where 127 * ACT_MAX * K would overflow int32
OUTLIER = 4.0  # inputs above this many rms(y) are bounded term by term (an outlier would dominate ||y||)
ROW_SCALE, ROW_E_NORM, ROW_W_TERM, ROW_Q_NORM = range(4)  # rows: f32[4, M]
ACT_SCALE, ACT_NORM, ACT_D_NORM, ACT_SMALL_NORM, ACT_BIG_L1 = range(5)  # act: f64[T, 5]
E_MAX = 0.5 + 2.0 ** -16  # |w - s q| <= E_MAX * s: q = rint(float32(w / s))
ROWS_PER_TASK = 64
_REL = 2.0 ** -22  # outward rounding margin for the float64 -> float32 store
_PRODUCT_REL = 2.0 ** -20  # the float64 products that make A_r
_NORM_UP = 1.0 + 2.0 ** -30  # float64 norms of K terms, rounded up


def activation_max(K: int) -> int:
    """Largest activation code for rows of K int8 weights: every partial int32 sum stays exact."""
    return min(ACT_MAX, (2 ** 31 - 1) // (127 * max(K, 1)))


@njit(**JIT)
def quantize_activation_i16(y, p_max, p, act):
    """y: f32[T, K] (finite) -> p: i16[T, K] = round_half_even(y / scale), scale = max|y| / p_max (1 for a zero
    row); act: f64[T, 5]: the scale, and upper bounds of ||y||, ||y - scale p||, ||y_small|| (inputs up to
    OUTLIER * rms(y)) and ||y_big||_1 (the others)."""
    T, K = y.shape
    for t in range(T):
        amax = n2 = 0.0
        for k in range(K):
            v = np.float64(y[t, k])
            amax = max(amax, abs(v))
            n2 += v * v
        s = amax / p_max if amax > 0 else 1.0
        cut = OUTLIER * np.sqrt(n2 / K)
        d2 = small2 = big1 = 0.0
        for k in range(K):
            v = np.float64(y[t, k])
            code = np.rint(v / s)
            p[t, k] = np.int16(code)
            d = v - s * code
            d2 += d * d
            if abs(v) > cut:
                big1 += abs(v)
            else:
                small2 += v * v
        norm = np.sqrt(n2) * _NORM_UP
        act[t, ACT_SCALE] = s
        act[t, ACT_NORM] = norm
        act[t, ACT_D_NORM] = np.sqrt(d2) * _NORM_UP + norm * 2.0 ** -40
        act[t, ACT_SMALL_NORM] = np.sqrt(small2) * _NORM_UP
        act[t, ACT_BIG_L1] = big1 * _NORM_UP


@njit(**JIT)
def _store_bounds(dots, m0, t, rows, act, lower, upper):
    """dots: i32[n] exact integer dots q.p of rows m0.. with token t -> lower[t, m0:m0 + n] <= V <= upper[...].
    A separate pass over a task's rows (after its dots; branch-free, so LLVM vectorizes it): the same float64
    arithmetic computed between one row's dot and the next slowed the weight stream to 0.80-0.85 of a plain read
    (the 2B-4T screen 14.4 against 13.4 ms, one process)."""
    n = dots.shape[0]
    s_act, small, big, norm, d_norm = (act[t, ACT_SCALE], act[t, ACT_SMALL_NORM], act[t, ACT_BIG_L1],
                                       act[t, ACT_NORM], act[t, ACT_D_NORM])
    scales, e_norms = rows[ROW_SCALE, m0:m0 + n], rows[ROW_E_NORM, m0:m0 + n]
    w_terms, q_norms = rows[ROW_W_TERM, m0:m0 + n], rows[ROW_Q_NORM, m0:m0 + n]
    lo_out, hi_out = lower[t, m0:m0 + n], upper[t, m0:m0 + n]
    for i in range(n):
        scale = np.float64(scales[i])
        a = np.float64(dots[i]) * scale * s_act
        b = (np.float64(e_norms[i]) * small + scale * E_MAX * big + np.float64(w_terms[i]) * norm
             + np.float64(q_norms[i]) * d_norm + abs(a) * _PRODUCT_REL + 1e-30)
        b = b if b < np.inf else np.inf  # an inf row (inf * 0 is NaN): no bound
        lo, hi = a - b, a + b
        lo_out[i] = np.float32(lo - abs(lo) * _REL)
        hi_out[i] = np.float32(hi + abs(hi) * _REL)


@njit(**JIT)
def _dot_tail(wq, m, p, t, k0):
    """Integer dot over k >= k0 (the K % 32 values after the SIMD chunks, or all of them)."""
    acc = 0
    for k in range(k0, wq.shape[1]):
        acc += np.int32(wq[m, k]) * np.int32(p[t, k])
    return acc


@njit(**JIT_PARALLEL)
def screen_bounds_plain(wq, rows, p, act, lower, upper):
    """screen_bounds in plain loops (hosts without AVX2; the tests compare the two): the same integers."""
    M = wq.shape[0]
    T = p.shape[0]
    n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        m_lo = task * ROWS_PER_TASK
        m_hi = min(M, m_lo + ROWS_PER_TASK)
        dots = np.empty(m_hi - m_lo, np.int32)
        for t in range(T):
            for m in range(m_lo, m_hi):
                dots[m - m_lo] = _dot_tail(wq, m, p, t, 0)
            _store_bounds(dots, m_lo, t, rows, act, lower, upper)


if HAVE_AVX2:
    if HAVE_AVX512:
        from .simd_avx512 import i8_i16_dot1, i8_i16_dot2, i8_i16_dot4
    else:
        from .simd_dense import i8_i16_dot1, i8_i16_dot2, i8_i16_dot4

    @njit(**JIT_PARALLEL)
    def screen_bounds_one(wq, rows, p, act, lower, upper, n_threads):
        """screen_bounds for one token and K a multiple of 32 (a decode step of one sequence). In its own
        function: the same loop inside screen_bounds_many, with the token groups' and the K tail's code around it,
        took 1.2x the time (2B-4T head, 16.5 against 12.9-13.7 ms, one process). Tasks as the base-3 matmuls
        hand them out (kernels.tasks.next_task): greedy 2B-4T decode 1.010-1.101x against the static split (9 of
        10, 8 of 8, and 7 of 8 rounds with GOMP_SPINCOUNT=1000000; `scripts/bench_ab.py ... --against a724539`)."""
        M, K = wq.shape
        n = K // 32
        wf, pf = wq.reshape(-1), p.reshape(-1)
        n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        workers = worker_count(n_tasks, n_threads)
        ranges = task_ranges(n_tasks, workers)
        for t in prange(workers):
            dots = np.empty(ROWS_PER_TASK, np.int32)
            task = next_task(ranges, t)
            while task >= 0:
                m_lo = task * ROWS_PER_TASK
                m_hi = min(M, m_lo + ROWS_PER_TASK)
                for m in range(m_lo, m_hi):
                    dots[m - m_lo] = i8_i16_dot1(wf, m * K, pf, 0, K, n)
                _store_bounds(dots[:m_hi - m_lo], m_lo, 0, rows, act, lower, upper)
                task = next_task(ranges, t)

    @njit(**JIT_PARALLEL)
    def screen_bounds_many(wq, rows, p, act, lower, upper, n_threads):
        """screen_bounds for any T and K. Four tokens (then a pair) share each weight load:
        the 2B-4T head's screen for 4 / 8 / 16 tokens took 1.34 / 1.30 / 1.24 x less time than with pairs (one
        process, alternated); 2 rows x 4 tokens and 8 tokens measured slower than 4 (two weight streams; spilled
        registers). The K % 32 tail loops are called only where there is a tail: with the calls always made
        (empty loops) the four-token loop was no faster than pairs, and a helper holding the tail and the store
        took 1.7-1.8 x the time for 4-16 tokens, hence the spelled-out loops. Tasks handed out as in
        screen_bounds_one: 4 sequences decoded together with top-40 requests 1.046-1.048x (7 of 8, 5 of 6 rounds,
        `scripts/bench_ab.py ... -b 4 --top-k 40 --same-top-k --against fe86115`); called alone for 4 tokens, the
        same time as the static split (20.34 against 20.35 ms)."""
        M, K = wq.shape
        T = p.shape[0]
        n = K // 32
        tail = n * 32 < K
        wf, pf = wq.reshape(-1), p.reshape(-1)
        n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        workers = worker_count(n_tasks, n_threads)
        ranges = task_ranges(n_tasks, workers)
        for worker in prange(workers):
            task = next_task(ranges, worker)
            while task >= 0:
                m_lo = task * ROWS_PER_TASK
                m_hi = min(M, m_lo + ROWS_PER_TASK)
                dots = np.empty((4, m_hi - m_lo), np.int32)  # [token of the group, row]
                t = 0
                while n and t + 4 <= T:
                    for m in range(m_lo, m_hi):
                        d0, d1, d2, d3 = i8_i16_dot4(wf, m * K, pf, t * K, K, n)
                        if tail:
                            d0 += _dot_tail(wq, m, p, t, n * 32)
                            d1 += _dot_tail(wq, m, p, t + 1, n * 32)
                            d2 += _dot_tail(wq, m, p, t + 2, n * 32)
                            d3 += _dot_tail(wq, m, p, t + 3, n * 32)
                        dots[0, m - m_lo], dots[1, m - m_lo], dots[2, m - m_lo], dots[3, m - m_lo] = d0, d1, d2, d3
                    for i in range(4):
                        _store_bounds(dots[i], m_lo, t + i, rows, act, lower, upper)
                    t += 4
                while n and t + 2 <= T:
                    for m in range(m_lo, m_hi):
                        d0, d1 = i8_i16_dot2(wf, m * K, pf, t * K, K, n)
                        if tail:
                            d0 += _dot_tail(wq, m, p, t, n * 32)
                            d1 += _dot_tail(wq, m, p, t + 1, n * 32)
                        dots[0, m - m_lo], dots[1, m - m_lo] = d0, d1
                    _store_bounds(dots[0], m_lo, t, rows, act, lower, upper)
                    _store_bounds(dots[1], m_lo, t + 1, rows, act, lower, upper)
                    t += 2
                while t < T:  # one token, or K < 32
                    for m in range(m_lo, m_hi):
                        d0 = _dot_tail(wq, m, p, t, n * 32) if tail else 0
                        if n:
                            d0 += i8_i16_dot1(wf, m * K, pf, t * K, K, n)
                        dots[0, m - m_lo] = d0
                    _store_bounds(dots[0], m_lo, t, rows, act, lower, upper)
                    t += 1
                task = next_task(ranges, worker)

    def screen_bounds(wq, rows, p, act, lower, upper):
        """wq: i8[M, K] (C order), rows: f32[4, M] (quantize_f16_rows_i8); p, act from quantize_activation_i16
        -> lower, upper: f32[T, M] around each exact f16 logit."""
        if p.shape[0] == 1 and wq.shape[1] % 32 == 0:
            screen_bounds_one(wq, rows, p, act, lower, upper, get_num_threads())
        else:
            screen_bounds_many(wq, rows, p, act, lower, upper, get_num_threads())
else:
    screen_bounds = screen_bounds_plain
