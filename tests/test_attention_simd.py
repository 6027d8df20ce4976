"""kernels/simd_attention.py against slow numpy references: p.v bit for bit (the same fused float32 operations in
the same order), q.k exactly where the arithmetic is exact, and its lane-reduction tree bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from naive import heads_first

from kernels.simd import HAVE_AVX512, HAVE_F16C

pytestmark = pytest.mark.skipif(not HAVE_F16C, reason="the attention intrinsics need hardware float16 conversion")

if HAVE_F16C:
    from kernels.attention_fast import _dot as one_head_dot
    from kernels.simd_attention import pv4x16, pv4x32, qk4x2

    @njit
    def qk_all(q, t, h0, k16, kvh, slots, out):  # out: f32[4, n] (pairs of keys, the last one alone)
        n = slots.shape[0]
        for j in range(0, n, 2):
            r = qk4x2(q, t, h0, k16, kvh, slots[j], slots[min(j + 1, n - 1)])
            for g in range(4):
                out[g, j] = r[g]
                if j + 1 < n:
                    out[g, j + 1] = r[4 + g]

    @njit
    def pv16_range(sc, slots, j0, j1, v16, kvh, d, acc, c):
        pv4x16(sc, slots, j0, j1, v16, kvh, d, acc, c)

    @njit
    def pv32_range(sc, slots, j0, j1, v16, kvh, d, acc, c):
        pv4x32(sc, slots, j0, j1, v16, kvh, d, acc, c)

PV_FORMS = [16] + ([32] if HAVE_AVX512 else [])  # dims per call; the zmm form runs only on AVX-512 hosts


def f16_cache(rng, n_slots, kvh, dim, values):
    return rng.choice(values, size=(n_slots, kvh, dim)).astype(np.float16).view(np.uint16)


def test_qk_dots_are_exact_where_the_arithmetic_is_exact():
    rng = np.random.default_rng(0)
    steps = np.arange(-8, 9) / 8  # products and every partial sum are multiples of 1/64 below 2^12: exact
    q = rng.choice(steps, size=(3, 12, 128)).astype(np.float32)
    k16 = f16_cache(rng, 40, 3, 128, steps)
    for n in (1, 2, 7, 40):
        slots = rng.permutation(40)[:n].astype(np.int64)
        out = np.full((4, n), np.nan, np.float32)
        qk_all(q, 2, 4, heads_first(k16), 1, slots, out)
        k = k16.view(np.float16).astype(np.float64)
        want = np.einsum("gd,jd->gj", q[2, 4:8].astype(np.float64), k[slots, 1])
        np.testing.assert_array_equal(out, want.astype(np.float32))


def test_qk_reduction_tree_is_the_documented_one():
    """One 8-dim chunk: lane l is q[l] * k[l] rounded once, then ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = (rng.standard_normal((1, 4, 8)) * 10.0 ** rng.integers(-3, 4, (1, 4, 8))).astype(np.float32)
        k16 = rng.standard_normal((2, 1, 8)).astype(np.float16).view(np.uint16)
        out = np.empty((4, 2), np.float32)
        qk_all(q, 0, 0, heads_first(k16), 0, np.array([0, 1], np.int64), out)
        for g in range(4):
            for j in range(2):
                lane = q[0, g] * k16[j, 0].view(np.float16).astype(np.float32)  # float32 products
                want = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]))
                assert out[g, j] == want, (g, j)


def test_qk_matches_float64_at_real_sizes():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 20, 128)).astype(np.float32)
    k16 = rng.standard_normal((300, 5, 128)).astype(np.float16).view(np.uint16)
    slots = rng.permutation(300).astype(np.int64)
    out = np.empty((4, 300), np.float32)
    qk_all(q, 0, 16, heads_first(k16), 4, slots, out)
    want = np.einsum("gd,jd->gj", q[0, 16:20].astype(np.float64), k16.view(np.float16)[slots, 4].astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def fma32(a, b, c):
    """float32 fused multiply-add: a * b + c with one rounding. The float64 product of two float32 values is
    exact; the float64 sum is exact too where the addends' exponents are within 29 of each other (here always),
    so the one rounding is the float32 one."""
    return (np.float64(a) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def pv_reference(sc, slots, j0, j1, v16, kvh, d, acc, c, width):
    """float32, key by key: acc = fma(p, v, acc) (one rounding per key)."""
    v = v16.view(np.float16).astype(np.float32)
    for j in range(j0, j1):
        for g in range(4):
            acc[g, c:c + width] = fma32(sc[g, j], v[slots[j], kvh, d:d + width], acc[g, c:c + width])


@pytest.mark.parametrize("width", PV_FORMS)
@pytest.mark.parametrize("j0,j1,d,c", [(0, 64, 0, 0), (5, 77, 48, 16), (10, 10, 0, 0), (3, 4, 96, 0)])
def test_pv_is_bit_identical_to_sequential_fused_float32(j0, j1, d, c, width):
    rng = np.random.default_rng(j0 + j1 + d)
    v16 = rng.standard_normal((90, 5, 128)).astype(np.float16).view(np.uint16)
    big = np.abs(rng.standard_normal((7, 100))).astype(np.float32) / 50
    sc = big[2:6]  # rows of a larger array (row stride 100)
    slots = rng.permutation(90).astype(np.int64)
    acc = rng.standard_normal((4, 64)).astype(np.float32)
    want = acc.copy()
    pv_reference(sc, slots, j0, j1, v16, 3, d, want, c, width)
    outside = [i for i in range(64) if not c <= i < c + width]
    untouched = acc[:, outside].copy()
    unfused = acc.copy()  # the same keys with each product rounded before its add
    v = v16.view(np.float16).astype(np.float32)
    for j in range(j0, j1):
        for g in range(4):
            unfused[g, c:c + width] += np.float32(sc[g, j]) * v[slots[j], 3, d:d + width]
    (pv16_range if width == 16 else pv32_range)(sc, slots, j0, j1, heads_first(v16), 3, d, acc, c)
    np.testing.assert_array_equal(acc[:, c:c + width], want[:, c:c + width])
    np.testing.assert_array_equal(acc[:, outside], untouched)
    if j1 - j0 > 10:  # the data tell a fused sum from an unfused one
        assert not np.array_equal(want[:, c:c + width], unfused[:, c:c + width])


def one_head_dot_reference(q, row):
    """The documented order of kernels.attention_fast._dot (qk1x32, then the remaining dims one by one): four
    8-lane accumulators, lane l of accumulator a holding dims 32c + 8a + l, each step one fused multiply-add
    (float64 product and add, then one float32 rounding: exact but for double-rounding ties), then
    (a0 + a1) + (a2 + a3), lanes (l + l+4), (0+2, 1+3), 0+1; the tail dims as float32 multiply, then add."""
    D = row.shape[0]
    n = D - D % 32
    acc = np.zeros((4, 8), np.float32)
    for c in range(0, n, 32):
        for a in range(4):
            dims = slice(c + 8 * a, c + 8 * a + 8)
            acc[a] = (q[dims].astype(np.float64) * row[dims].astype(np.float64) + acc[a]).astype(np.float32)
    v = (acc[0] + acc[1]) + (acc[2] + acc[3])
    half = v[:4] + v[4:]
    pair = half[:2] + half[2:]
    total = np.float32(pair[0] + pair[1])
    for d in range(n, D):
        total = np.float32(total + np.float32(q[d] * row[d]))
    return total


@pytest.mark.parametrize("D", [64, 128, 256, 96, 70, 20])
def test_one_head_dot_has_the_documented_order_on_every_host(D):
    """Bit for bit against the numpy replay, with float32 values whose products round (so fusion and order both
    show): LLVM may not reorder it, unlike the reassociated loop it replaces, which summed 16 lanes on Genoa."""
    rng = np.random.default_rng(D)
    for _ in range(30):
        q = (rng.standard_normal((2, 3, D)) * 10.0 ** rng.integers(-2, 3, (2, 3, D))).astype(np.float32)
        row = rng.standard_normal(D).astype(np.float32)
        assert one_head_dot(q, 1, 2, row) == one_head_dot_reference(q[1, 2], row)
    assert not one_head_dot.targetoptions.get("fastmath")  # no reassociation: LLVM may not reorder the sum


@pytest.mark.skipif(not HAVE_AVX512, reason="the zmm p.v form is built for AVX-512 hosts only")
def test_pv_zmm_form_uses_zmm_registers():
    rng = np.random.default_rng(3)
    v16 = rng.standard_normal((1, 8, 32)).astype(np.float16).view(np.uint16)  # [KVH, n_slots, D]
    pv32_range(np.ones((4, 8), np.float32), np.arange(8), 0, 8, v16, 0, 0, np.zeros((4, 32), np.float32), 0)
    asm = next(iter(pv32_range.inspect_asm().values()))
    widen = [line for line in asm.splitlines() if "vcvtph2ps" in line]  # vcvtph2ps, or vcvtph2psx (AVX512-FP16)
    assert widen and all("%zmm" in line for line in widen)  # 16 float16 widened into one zmm register


def test_row_max_over_integer_keys_equals_the_float_maximum():
    """kernels.attention_fast._row_max against numpy: all-negative rows, -inf, tiny and huge magnitudes, empty
    ranges (-inf); a zero maximum of either sign comes back as a zero."""
    from kernels.attention_fast import _row_max
    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(0, 300))
        s = (rng.standard_normal((4, 300)) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
        if trial % 3 == 0:
            s[2] = -np.abs(s[2])
        if trial % 5 == 0:
            s[2, :n // 2] = -np.inf
        if trial % 7 == 0:
            s[2, : n // 3] = np.float32(-0.0)
        got, want = _row_max(s, 2, n), (s[2, :n].max() if n else np.float32(-np.inf))
        assert got == want and (want == 0 or np.float32(got).tobytes() == np.float32(want).tobytes()), (n, got, want)
