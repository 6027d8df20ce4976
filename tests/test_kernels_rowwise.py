"""Row-wise kernels against slow references: float16 conversion (numpy's astype), RMS norm (ggml's sequential
double sum, whatever the rows are grouped in), activation quantization on rows with negative maxima."""
import numpy as np
import pytest

import naive
from kernels.f16 import round_rows_f16
from kernels.simd import HAVE_F16C
from kernels.norms import rms_norm, rms_norm_parallel
from kernels.quantize import quantize_rows_i8, quantize_rows_i8_parallel

RNG = np.random.default_rng(77)


def _f16_sweep() -> np.ndarray:
    """float32 values around every float16 regime: normals, subnormals, exact ties, overflow, signed zeros."""
    halves = np.arange(0, 0x7C00, 7, dtype=np.uint16).view(np.float16).astype(np.float32)  # finite halves
    next_up = np.nextafter(halves, np.float32(np.inf))
    ties = (halves[:-1] + np.diff(halves) / 2).astype(np.float32)  # exact midpoints: ties to even
    specials = np.float32([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, np.inf, -np.inf, 2 ** -25, 2 ** -26,
                           3 * 2 ** -26, 6e-8, 1e-12])
    v = np.concatenate([halves, next_up, ties, specials, RNG.standard_normal(5000).astype(np.float32) * 100])
    return np.concatenate([v, -v])


def _to_f16_bits(x: np.ndarray) -> np.ndarray:
    """The f32_to_f16_bits intrinsic (KV stores) over an array."""
    from numba import njit

    from kernels.simd import f32_to_f16_bits

    @njit
    def convert(x, out):
        for i in range(x.shape[0]):
            out[i] = f32_to_f16_bits(x[i])

    out = np.empty(x.size, np.uint16)
    convert(x, out)
    return out


def test_f16_bits_and_rounding_equal_numpy():
    x = _f16_sweep()
    with np.errstate(over="ignore"):  # values beyond 65504 become inf, as they must
        ref = x.astype(np.float16)
    if HAVE_F16C:
        assert np.array_equal(_to_f16_bits(x), ref.view(np.uint16))
    rounded = np.empty_like(x)
    round_rows_f16(x, rounded)
    assert np.array_equal(rounded.view(np.uint32), ref.astype(np.float32).view(np.uint32))
    round_rows_f16(x, x)  # in place
    assert np.array_equal(x, rounded)


def test_f16_nan_stays_nan():
    x = np.float32([np.nan, 1.0])
    rounded = np.empty_like(x)
    round_rows_f16(x, rounded)
    assert np.isnan(rounded[0]) and rounded[1] == 1.0
    if HAVE_F16C:
        bits = _to_f16_bits(x)
        assert np.isnan(bits.view(np.float16)[0]) and bits.view(np.float16)[1] == 1.0


def _rms_sequential(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """ggml's order, one Python float (double) add at a time."""
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        total = 0.0
        for v in x[t]:
            total += float(np.float32(v * v))
        mean = np.float32(total / x.shape[1])
        scale = np.float32(1.0) / np.float32(np.sqrt(np.float32(mean + np.float32(eps))))
        out[t] = (x[t] * scale) * w
    return out


@pytest.mark.parametrize("T", [1, 3, 4, 5, 8, 9])
def test_rms_norm_grouped_rows_keep_sequential_sums(T):
    N = 1536
    x = (RNG.standard_normal((T, N)) * np.exp(RNG.standard_normal((T, N)) * 3)).astype(np.float32)  # wide range
    w = (1 + 0.25 * RNG.standard_normal(N)).astype(np.float32)
    ref = _rms_sequential(x, w, 1e-6)
    par, ser = np.empty_like(x), np.empty_like(x)
    rms_norm_parallel(x, w, 1e-6, par)
    rms_norm(x, w, 1e-6, ser)
    assert np.array_equal(par, ref) and np.array_equal(ser, ref)
    np.testing.assert_allclose(par, naive.rms_norm(x, w, 1e-6), rtol=2e-6, atol=1e-6)
    rms_norm_parallel(x, w, 1e-6, x)  # in place
    assert np.array_equal(x, ref)


def _eight_lane_sum(row):
    """The kernel's float64 partial sums (kernels.norms._mean_square) replayed in numpy."""
    sq = (row * row).astype(np.float64)
    n8 = len(row) // 8 * 8
    lanes = [0.0] * 8
    for i in range(0, n8, 8):
        for j in range(8):
            lanes[j] += sq[i + j]
    for v in sq[n8:]:
        lanes[0] += v
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


@pytest.mark.parametrize("tail", [0, 3])
def test_rms_norm_takes_the_sequential_sum_where_the_partial_sums_round_the_mean_differently(tail):
    """Squares 16, 2^-20 and 2^-50s: added one after the other the 2^-50s are lost (below half of 16's float64
    ulp) and the mean is exactly the float32 midpoint 1 + 2^-24 (rounds to even: 1.0); in eight partial sums
    they add up first and push the mean past it (1 + 2^-23). The kernel must give the sequential result."""
    x = np.full((1, 16 + tail), 2.0 ** -25, np.float32)
    x[0, 0], x[0, 1] = 4.0, 2.0 ** -10
    N = x.shape[1]
    seq_mean = np.float32(sum(float(np.float32(v * v)) for v in x[0]) / N)
    if tail == 0:
        assert seq_mean == np.float32(1.0) and np.float32(_eight_lane_sum(x[0]) / N) != seq_mean  # the case bites
    w = np.ones(N, np.float32)
    ref = _rms_sequential(x, w, 0.0)
    for kernel in (rms_norm, rms_norm_parallel):
        out = np.empty_like(x)
        kernel(x, w, 0.0, out)
        assert np.array_equal(out, ref)


@pytest.mark.parametrize("N", [1, 7, 8, 2560, 6912, 6913])
def test_rms_norm_of_zeros_infinities_and_nans_is_the_sequential_result(N):
    x = RNG.standard_normal((4, N)).astype(np.float32)
    x[0] = 0.0
    x[1, -1] = np.inf
    x[2, 0] = np.nan
    x[3, :] = 3e38  # squares overflow to inf
    w = np.ones(N, np.float32)
    out = np.empty_like(x)
    rms_norm(x, w, 1e-6, out)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = _rms_sequential(x, w, 1e-6)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("T", [1, 6, 9])
def test_quantize_rows_negative_maxima_and_zeros(T):
    K = 640
    x = RNG.standard_normal((T, K)).astype(np.float32)
    x[:, 3] = -9.5  # the largest magnitude is negative
    x[0, :] = -0.0 if T > 1 else x[0, :]
    q, s, sums = np.empty((T, K), np.int8), np.empty(T, np.float32), np.empty(T, np.int32)
    (quantize_rows_i8_parallel if T > 1 else quantize_rows_i8)(x, 1e-5, q, s, sums)
    rq, rs, rsum = naive.quantize_rows_i8(x, 1e-5)
    assert np.array_equal(q, rq) and np.array_equal(s, rs) and np.array_equal(sums, rsum)
    first = 1 if T > 1 else 0  # row 0 is all zeros when T > 1
    assert (q[first:, 3] == -127).all() and (T == 1 or not q[0].any())


def test_parallel_activations_equal_serial_and_reference():
    from kernels.activations import relu2_mul, relu2_mul_parallel, silu_mul, silu_mul_parallel
    g = (RNG.standard_normal((7, 896)) * 3).astype(np.float32)
    u = RNG.standard_normal((7, 896)).astype(np.float32)
    for serial, parallel, ref, tol in ((silu_mul, silu_mul_parallel, naive.silu_mul, 1e-5),
                                       (relu2_mul, relu2_mul_parallel, naive.relu2_mul, 1e-6)):
        a, b = np.empty_like(g), g.copy()
        serial(g, u, a)
        parallel(b, u, b)  # in place, as the model calls it
        assert np.array_equal(a, b)
        np.testing.assert_allclose(a, ref(g, u), rtol=tol, atol=tol / 10)


@pytest.mark.parametrize("neox", [True, False])
def test_rope_store_f16_equals_the_separate_steps(neox):
    from kernels.kv_store import rope_store_f16
    from kernels.rope import rope_apply, rope_tables
    T, H, KVH, D = 5, 8, 2, 64
    cos, sin = rope_tables(64, D, 10000.0)
    q = RNG.standard_normal((T, H, D)).astype(np.float32) * 3
    k = RNG.standard_normal((T, KVH, D)).astype(np.float32) * 3
    v = RNG.standard_normal((T, KVH, D)).astype(np.float32) * 3
    pos = np.array([0, 1, 7, 8, 40], np.int32)
    slots = np.array([9, 3, 30, 0, 17], np.int64)  # scattered cache rows
    rq, rk = q.copy(), k.copy()
    rope_apply(rq, pos, cos, sin, neox, D)
    rope_apply(rk, pos, cos, sin, neox, D)
    ref_k, ref_v = np.zeros((KVH, 32, D), np.uint16), np.zeros((KVH, 32, D), np.uint16)  # [KVH, n_slots, D]
    for i, s in enumerate(slots):
        ref_k[:, s], ref_v[:, s] = rk[i].astype(np.float16).view(np.uint16), v[i].astype(np.float16).view(np.uint16)
    kc, vc = np.zeros_like(ref_k), np.zeros_like(ref_v)
    rope_store_f16(q, k, v, pos, cos, sin, neox, D, slots, kc, vc)
    assert np.array_equal(kc, ref_k) and np.array_equal(vc, ref_v)
    assert np.array_equal(q, rq.astype(np.float16).astype(np.float32))  # Q rotated, then rounded to f16
    assert np.array_equal(k, rk)  # K rotated in place
