"""The screened head: exact top-k logits of a float16 output head, reading an int8 copy of it (half the bytes).

For row r of the head (f16 weights w, kept as q * s + e with q = int8 codes, s = the row scale, e the rounding
error) and the f16-rounded activation y, the exact kernel's logit V_r = f16_matmul's float32 dot. This module
computes A_r = s * x_scale * (q . p), with p = y / x_scale rounded to 15-bit integers (split into a signed high
byte and an unsigned low byte, so the int8 dot kernels do the work exactly), and a bound B_r with
|V_r - A_r| <= B_r:
  V_r - w.y       <= (K + 8) 2^-24 ||w|| ||y||      (float32 summation; in err_bound, see quantize_f16_rows_i8)
  w.y - s q.y      = e.y  <= ||e|| ||y||            (Cauchy-Schwarz; ||e|| in err_bound)
  s q.y - A_r      = s q.(y - x_scale p) <= s ||q|| ||y - x_scale p||   (q_norm * d_norm)
plus 2^-20 |A_r| for the float64 products and an outward rounding to float32. The caller then computes
exact logits only for rows whose interval can reach the top k (kernels.dense.f16_matmul on those rows).
"""
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL
from .simd import HAVE_AVX2

SPLIT_MAX = 16383  # |p| <= 2^14 - 1: p = 128 * hi + lo with hi in [-128, 127] and lo in [0, 127]
ROWS_PER_TASK = 64
_REL = 2.0 ** -22  # outward rounding margin for the float64 -> float32 store
_PRODUCT_REL = 2.0 ** -20  # the float64 products that make A_r


@njit(**JIT)
def split_activation(y, xs, xa, x_scale, x_norm, d_norm):
    """y: f32[T, K] -> xs: i8[T, 2, K] (hi, lo) and xa: u8[T, 2, K] (|hi|, lo) with p = 128 hi + lo =
    round_half_even(y / x_scale), x_scale: f64[T] = max|y| / SPLIT_MAX (1 for a zero row);
    x_norm: f64[T] >= ||y||_2, d_norm: f64[T] >= ||y - x_scale p||_2. Finite y only."""
    T, K = y.shape
    for t in range(T):
        amax = 0.0
        for k in range(K):
            amax = max(amax, abs(np.float64(y[t, k])))
        s = amax / SPLIT_MAX if amax > 0 else 1.0
        n2 = d2 = 0.0
        for k in range(K):
            v = np.float64(y[t, k])
            p = np.int64(np.rint(v / s))
            hi = p >> 7  # floor(p / 128)
            lo = p - 128 * hi
            xs[t, 0, k] = np.int8(hi)
            xa[t, 0, k] = np.uint8(abs(hi))
            xs[t, 1, k] = np.int8(lo)
            xa[t, 1, k] = np.uint8(lo)
            d = v - s * np.float64(p)
            n2 += v * v
            d2 += d * d
        x_scale[t] = s
        x_norm[t] = np.sqrt(n2) * (1.0 + 2.0 ** -30)
        d_norm[t] = np.sqrt(d2) * (1.0 + 2.0 ** -30) + x_norm[t] * 2.0 ** -40


@njit(**JIT)
def _store_bounds(hi_dot, lo_dot, m, t, row_scales, err_bound, q_norm, x_scale, x_norm, d_norm, lower, upper):
    """lower[t, m] <= V <= upper[t, m] from the exact integer dot 128 * hi_dot + lo_dot."""
    a = (128.0 * np.float64(hi_dot) + np.float64(lo_dot)) * np.float64(row_scales[m]) * x_scale[t]
    b = (np.float64(err_bound[m]) * x_norm[t] + np.float64(q_norm[m]) * d_norm[t] + abs(a) * _PRODUCT_REL
         + 1e-30)
    lo, hi = a - b, a + b
    lower[t, m] = np.float32(lo - abs(lo) * _REL)
    upper[t, m] = np.float32(hi + abs(hi) * _REL)


@njit(**JIT)
def _split_dot_tail(wq, m, xs, t, k0):
    """(hi, lo) integer dots over k >= k0 (the K % 32 values after the SIMD chunks, or all of them)."""
    h = lo = 0
    for k in range(k0, wq.shape[1]):
        h += np.int32(wq[m, k]) * np.int32(xs[t, 0, k])
        lo += np.int32(wq[m, k]) * np.int32(xs[t, 1, k])
    return h, lo


if HAVE_AVX2:
    from .simd_dense import i8_dot_abs2, i8_dot_abs4

    @njit(**JIT_PARALLEL)
    def screen_bounds(wq, row_scales, err_bound, q_norm, xs, xa, x_scale, x_norm, d_norm, lower, upper):
        """wq: i8[M, K] (C order), row_scales / err_bound / q_norm: f32[M] (quantize_f16_rows_i8); xs, xa, x_scale,
        x_norm, d_norm from split_activation -> lower, upper: f32[T, M] around each exact f16 logit.
        Token pairs share each weight load: four int8 rows (hi, lo of two tokens) per dot."""
        M, K = wq.shape
        T = xs.shape[0]
        n = K // 32
        wf, xf, xaf = wq.reshape(-1), xs.reshape(-1), xa.reshape(-1)
        n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for task in prange(n_tasks):
            m_lo = task * ROWS_PER_TASK
            m_hi = min(M, m_lo + ROWS_PER_TASK)
            t = 0
            while t < T:
                two = t + 2 <= T
                for m in range(m_lo, m_hi):
                    h0, l0 = _split_dot_tail(wq, m, xs, t, n * 32)
                    h1 = l1 = 0
                    if two:
                        h1, l1 = _split_dot_tail(wq, m, xs, t + 1, n * 32)
                    if n and two:
                        a, b, c, d = i8_dot_abs4(wf, m * K, xf, xaf, 2 * t * K, K, n)
                        h0, l0, h1, l1 = h0 + a, l0 + b, h1 + c, l1 + d
                    elif n:
                        a, b = i8_dot_abs2(wf, m * K, xf, xaf, 2 * t * K, K, n)
                        h0, l0 = h0 + a, l0 + b
                    _store_bounds(h0, l0, m, t, row_scales, err_bound, q_norm, x_scale, x_norm, d_norm, lower, upper)
                    if two:
                        _store_bounds(h1, l1, m, t + 1, row_scales, err_bound, q_norm, x_scale, x_norm, d_norm,
                                      lower, upper)
                t += 2
else:
    @njit(**JIT_PARALLEL)
    def screen_bounds(wq, row_scales, err_bound, q_norm, xs, xa, x_scale, x_norm, d_norm, lower, upper):
        """wq: i8[M, K]; row_scales / err_bound / q_norm: f32[M]; xs, xa, x_scale, x_norm, d_norm from
        split_activation -> lower, upper: f32[T, M] around each exact f16 logit (plain loops)."""
        M = wq.shape[0]
        T = xs.shape[0]
        n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for task in prange(n_tasks):
            for m in range(task * ROWS_PER_TASK, min(M, (task + 1) * ROWS_PER_TASK)):
                for t in range(T):
                    h, lo = _split_dot_tail(wq, m, xs, t, 0)
                    _store_bounds(h, lo, m, t, row_scales, err_bound, q_norm, x_scale, x_norm, d_norm, lower, upper)
