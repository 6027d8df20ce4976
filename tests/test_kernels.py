"""Every kernel against its slow numpy reference (tests/naive.py); integer paths must match exactly."""
import numpy as np
import pytest

import naive
from bitnet_py.gguf.ternary_pack import pack_i2s_codes
from kernels.activations import relu2_mul, silu_mul
from kernels.attention import paged_attention
from kernels.dense import f16_matmul
from kernels.f16 import f16_lut, round_to_f16
from kernels.norms import rms_norm, rms_norm_parallel
from kernels.quantize import quantize_rows_i8, quantize_rows_i8_parallel
from kernels.rope import rope_apply, rope_tables
from kernels.ternary_matmul import i2s_matmul

RNG = np.random.default_rng(1234)


def _act(T, K, scale=1.0):
    x = (RNG.standard_normal((T, K)) * scale).astype(np.float32)
    x[0, 0] = 7.5 * scale  # an outlier like real activations
    return x


@pytest.mark.parametrize("T,K,floor", [(1, 128, 1e-5), (3, 256, 1e-5), (5, 2560, 0.0), (2, 6912, 1e-5)])
def test_quantize_rows_exact(T, K, floor):
    x = _act(T, K)
    q, s, sums = np.empty((T, K), np.int8), np.empty(T, np.float32), np.empty(T, np.int32)
    quantize_rows_i8(x, floor, q, s, sums)
    rq, rs, rsum = naive.quantize_rows_i8(x, floor)
    assert np.array_equal(q, rq) and np.array_equal(s, rs) and np.array_equal(sums, rsum)
    q2, s2, sums2 = np.empty_like(q), np.empty_like(s), np.empty_like(sums)
    quantize_rows_i8_parallel(x, floor, q2, s2, sums2)
    assert np.array_equal(q2, q) and np.array_equal(s2, s) and np.array_equal(sums2, sums)
    assert q.min() >= -128 and q.max() <= 127 and (np.abs(q) == 127).any()


def test_quantize_zero_row_and_floor():
    x = np.zeros((2, 128), np.float32)
    x[1, 5] = 1e-7  # below the I2_S floor: scale is 127 / 1e-5
    q, s, sums = np.empty((2, 128), np.int8), np.empty(2, np.float32), np.empty(2, np.int32)
    quantize_rows_i8(x, 1e-5, q, s, sums)
    assert not q[0].any() and s[1] == np.float32(127.0 / 1e-5) and q[1, 5] == 1
    quantize_rows_i8(x, 0.0, q, s, sums)
    assert s[0] == 1.0 and not q[0].any() and q[1, 5] == 127


@pytest.mark.parametrize("T,M,K", [(1, 1, 128), (1, 7, 256), (4, 33, 384), (9, 64, 1280), (2, 5, 6912)])
def test_i2s_matmul_exact(T, M, K):
    w = RNG.integers(-1, 2, size=(M, K)).astype(np.int8)
    q = RNG.integers(-128, 128, size=(T, K)).astype(np.int8)
    q[0, :] = 127 if K <= 256 else q[0, :]  # extreme values
    s = (RNG.random(T) * 100 + 1).astype(np.float32)
    scale = np.float32(0.0731)
    sums = q.astype(np.int32).sum(axis=1).astype(np.int32)
    out = np.empty((T, M), np.float32)
    i2s_matmul(pack_i2s_codes(w), q, s, sums, scale, out, 0)
    assert np.array_equal(out, naive.ternary_matmul(w, q, s, scale))


@pytest.mark.parametrize("T,N", [(1, 256), (3, 2560), (2, 6912)])
def test_rms_norm(T, N):
    x = _act(T, N, 3.0)
    w = (1 + 0.25 * RNG.standard_normal(N)).astype(np.float32)
    out = np.empty_like(x)
    rms_norm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, naive.rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    par = np.empty_like(x)
    rms_norm_parallel(x, w, 1e-5, par)
    assert np.array_equal(par, out)
    rms_norm(x, w, 1e-5, x)  # in place
    assert np.array_equal(x, out)


@pytest.mark.parametrize("neox,D,base", [(True, 64, 10000.0), (False, 128, 10000.0), (True, 128, 500000.0)])
def test_rope(neox, D, base):
    T, H = 5, 3
    x = _act(T, H * D).reshape(T, H, D)
    pos = np.array([0, 1, 7, 100, 2047], np.int32)
    cos, sin = rope_tables(2048, D, base)
    y = x.copy()
    rope_apply(y, pos, cos, sin, neox, D)
    # float32 theta recurrence vs exact powers: relative angle error ~1e-7 * pos
    np.testing.assert_allclose(y, naive.rope(x, pos, base, neox, D), rtol=0, atol=5e-3)
    np.testing.assert_array_equal(y[0], x[0])  # position 0 is the identity
    assert not np.allclose(y[3], x[3])


def _f16(a):
    return a.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("round_probs", [False, True])
def test_paged_attention(round_probs):
    H, KVH, D, bs = 4, 2, 64, 4
    n_blocks = 8
    k_cache = _f16(RNG.standard_normal((n_blocks * bs, KVH, D)).astype(np.float32))
    v_cache = _f16(RNG.standard_normal((n_blocks * bs, KVH, D)).astype(np.float32))
    # two sequences with scattered blocks
    tables = np.array([[5, 2, 7, -1], [0, 3, -1, -1]], np.int32)
    pos = np.array([9, 10, 6], np.int32)
    seq = np.array([0, 0, 1], np.int32)
    q = _f16(RNG.standard_normal((3, H, D)).astype(np.float32))
    out = np.empty_like(q)
    rp = np.array([round_probs, round_probs])
    scale = np.float32(1 / 8)
    paged_attention(q, naive.heads_first(_bits(k_cache)), naive.heads_first(_bits(v_cache)),
                    np.zeros((KVH, 0, D), np.float32), np.zeros((KVH, 0, D), np.float32), False, pos, seq, tables, bs,
                    rp, scale, f16_lut(), out)
    out32 = np.empty_like(q)
    paged_attention(q, np.zeros((KVH, 0, D), np.uint16), np.zeros((KVH, 0, D), np.uint16),
                    naive.heads_first(k_cache), naive.heads_first(v_cache), True,
                    pos, seq, tables, bs, rp, scale, f16_lut(), out32)
    np.testing.assert_allclose(out32, out, rtol=1e-6, atol=1e-6)  # same values through either cache type
    for t in range(3):
        slots = np.array([tables[seq[t], j // bs] * bs + j % bs for j in range(pos[t] + 1)])
        ref = naive.attention(q[t], k_cache[slots], v_cache[slots], pos[t] + 1, scale, round_probs)
        np.testing.assert_allclose(out[t], ref, rtol=1e-4, atol=2e-5 if not round_probs else 2e-3)


def _bits(a):
    return a.astype(np.float16).view(np.uint16)


def test_f16_matmul():
    M, K, T = 131, 256, 3
    w = (RNG.standard_normal((M, K)) * 0.05).astype(np.float16)
    w[0, :4] = [6e-8, -6e-8, 1e-5, 65504]  # subnormal and extreme halves
    x = _f16(RNG.standard_normal((T, K)).astype(np.float32))
    out = np.empty((T, M), np.float32)
    f16_matmul(w.view(np.uint16), x, out)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_f16_lut_and_rounding():
    assert np.array_equal(f16_lut()[_bits(np.array([1.5, -2.0, 6e-8], np.float32))],
                          np.array([1.5, -2.0, np.float16(6e-8)], np.float32))
    vals = np.concatenate([RNG.random(20000).astype(np.float32),
                           (RNG.random(2000) * 1e-5).astype(np.float32),  # subnormal halves
                           np.float32([1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -24 * 0.5, 2 ** -24 * 1.5, -0.3])])
    got = np.array([round_to_f16(np.float32(v)) for v in vals], np.float32)
    assert np.array_equal(got, vals.astype(np.float16).astype(np.float32))  # ties to even included


def test_activations():
    g, u = _act(3, 768, 2.0), _act(3, 768)
    out = np.empty_like(g)
    silu_mul(g, u, out)
    np.testing.assert_allclose(out, naive.silu_mul(g, u), rtol=1e-5, atol=1e-6)
    relu2_mul(g, u, out)
    np.testing.assert_allclose(out, naive.relu2_mul(g, u), rtol=1e-6, atol=1e-7)


# --- fast paths (kernels/simd.py, kernels/select.py): every implementation against the numpy reference ---
from kernels.dense import f16_matmul_bits  # noqa: E402
from kernels.select import KERNELS  # noqa: E402
from kernels.simd import HAVE_AVX2, HAVE_F16C  # noqa: E402

# K = 128 (one block), odd block counts, 2B-4T widths; T covers the 4/2/1-token tiles and their tails;
# M covers partial row tasks (up to ROWS_PER_TASK = 32 rows, fewer where n_threads asks: kernels.tasks)
FAST_SHAPES = [(1, 1, 128), (2, 31, 128), (3, 33, 384), (4, 64, 640), (5, 7, 2560), (6, 40, 1152),
               (7, 65, 256), (9, 3, 6912), (13, 97, 512), (64, 35, 2560)]


def _ternary_case(T, M, K, extreme=False):
    w = RNG.integers(-1, 2, size=(M, K)).astype(np.int8)
    q = RNG.integers(-128, 128, size=(T, K)).astype(np.int8)
    if extreme:  # largest partial sums: all +1 weights against -128, all -1 against 127
        w[0, :] = 1
        q[0, :] = -128
        if M > 1:
            w[1, :] = -1
        if T > 1:
            q[1, :] = 127
    s = (RNG.random(T) * 100 + 1).astype(np.float32)
    sums = q.astype(np.int32).sum(axis=1).astype(np.int32)
    return w, q, s, sums


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("T,M,K", FAST_SHAPES)
@pytest.mark.parametrize("n_threads", [0, 2, 180])  # row tasks of 32; sized for 2 threads; for 180 (8-32 rows)
def test_ternary_kernels_exact(name, T, M, K, n_threads):
    w, q, s, sums = _ternary_case(T, M, K, extreme=(K <= 640))
    out = np.full((T, M), np.nan, np.float32)
    KERNELS[name].matmul(pack_i2s_codes(w), q, s, sums, np.float32(0.0731), out, n_threads)
    assert np.array_equal(out, naive.ternary_matmul(w, q, s, np.float32(0.0731)))


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("T,Ms,K", [(1, (64, 16, 16), 256), (3, (33, 5, 70), 384), (6, (40, 96, 0), 2560),
                                    (4, (2560, 640, 640), 2560)])
@pytest.mark.parametrize("n_threads", [0, 2, 180])
def test_ternary_kernels_multi_exact(name, T, Ms, K, n_threads):
    ws = [RNG.integers(-1, 2, size=(m, K)).astype(np.int8) for m in Ms]
    _, q, s, sums = _ternary_case(T, 1, K)
    scales = [np.float32(0.5), np.float32(0.25), np.float32(1.75)]
    outs = [np.full((T, m), np.nan, np.float32) for m in Ms]
    KERNELS[name].matmul_multi(*[pack_i2s_codes(w) for w in ws], q, s, sums, *scales, *outs, n_threads)
    for w, sc, out in zip(ws, scales, outs):
        assert np.array_equal(out, naive.ternary_matmul(w, q, s, sc))


@pytest.mark.skipif(not HAVE_AVX2, reason="the vpmaddubsw dots need AVX2")
def test_i2s_dots_largest_i16_lane_sums_stay_exact():
    # every code 3 (the largest code a byte can hold; I2_S writes 0-2) against -128 and 127 on every value: the
    # i16 lane sums of a whole loop step (BLOCKS_PER_STEP[n] blocks before widening) at their largest, plus the
    # single-block tail, for 1, 2 and 4 rows; compared with the byte layout's own definition of the codes
    from numba import njit

    from kernels.simd import BLOCKS_PER_STEP, i2s_dot1, i2s_dot2, i2s_dot4

    @njit(cache=False)
    def dots(packed, q, K, out):
        nb = K // 128
        out[0] = i2s_dot1(packed, 0, q, 0, K, nb)
        out[1], out[2] = i2s_dot2(packed, 0, q, 0, K, nb)
        out[3], out[4], out[5], out[6] = i2s_dot4(packed, 0, q, 0, K, nb)

    assert max(BLOCKS_PER_STEP.values()) * 2 * (2 * 12 * 128) < 32768  # the four-times sum's bound
    for K in (128 * max(BLOCKS_PER_STEP.values()), 128 * (2 * max(BLOCKS_PER_STEP.values()) + 3)):
        for fill in (0xFF, 0xAA, 0x55, None):
            packed = (np.full(K // 4, fill, np.uint8) if fill is not None
                      else RNG.integers(0, 256, K // 4).astype(np.uint8))
            blocks = packed.reshape(-1, 32)
            codes = np.concatenate([(blocks >> s) & 3 for s in (6, 4, 2, 0)], axis=1).reshape(-1)  # value order
            q = np.empty((4, K), np.int8)
            q[0], q[1] = -128, 127
            q[2] = RNG.integers(-128, 128, K)
            q[3] = np.where(np.arange(K) % 2, -128, 127)
            out = np.zeros(7, np.int64)
            dots(packed, q.reshape(-1), K, out)
            want = (codes.astype(np.int64) * q.astype(np.int64)).sum(axis=1)
            assert out[0] == want[0] and out[1:3].tolist() == want[:2].tolist(), (K, fill)
            assert out[3:].tolist() == want.tolist(), (K, fill)


def test_simd_kernel_is_used_where_available():
    # the fast kernel must actually be the SIMD one on AVX2 hosts (else the tests above test plain loops twice)
    from kernels.select import ternary_kernels
    from kernels.ternary_matmul import i2s_matmul, i2s_matmul_plain
    assert (ternary_kernels(2560, 2560, "auto").matmul is i2s_matmul) and ((i2s_matmul is i2s_matmul_plain)
                                                                          != HAVE_AVX2)


@pytest.mark.parametrize("T,M,K", [(1, 1, 8), (1, 130, 2560), (3, 67, 256), (5, 64, 100)])
def test_f16_matmul_fast_and_bits(T, M, K):
    w = (RNG.standard_normal((M, K)) * 0.05).astype(np.float16)
    w[0, :4] = [6e-8, -6e-8, 1e-5, 65504] if K >= 4 else w[0, :4]
    x = _f16(RNG.standard_normal((T, K)).astype(np.float32))
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    for fn in (f16_matmul, f16_matmul_bits):
        out = np.full((T, M), np.nan, np.float32)
        fn(w.view(np.uint16), x, out)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    assert (f16_matmul is not f16_matmul_bits) == HAVE_F16C


@pytest.mark.parametrize("K", [2560, 100])
def test_f16_matmul_rows_do_not_depend_on_batch(K):
    # a token's logits must be bit-identical whether it is alone or in a batch (server: alone == batch of 8)
    M, T = 97, 7
    w = _bits((RNG.standard_normal((M, K)) * 0.05).astype(np.float32))
    x = _f16(RNG.standard_normal((T, K)).astype(np.float32))
    batched = np.empty((T, M), np.float32)
    f16_matmul(w, x, batched)
    for t in range(T):
        alone = np.empty((1, M), np.float32)
        f16_matmul(w, np.ascontiguousarray(x[t:t + 1]), alone)
        assert np.array_equal(alone[0].view(np.uint32), batched[t].view(np.uint32))


def test_f16_to_f32_every_half():
    if not HAVE_F16C:
        pytest.skip("host converts float16 with bit operations only")
    from numba import njit

    from kernels.simd import f16_to_f32

    @njit
    def convert(bits, out):
        for i in range(bits.shape[0]):
            out[i] = f16_to_f32(bits[i])

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, np.float32)
    convert(bits, out)
    ref = bits.view(np.float16).astype(np.float32)
    finite = ~np.isnan(ref)  # hardware conversion may quiet signalling NaNs (never in weights)
    assert np.array_equal(np.isnan(out), ~finite)
    assert np.array_equal(out[finite].view(np.uint32), ref[finite].view(np.uint32))  # bit-exact, -0 and inf too


@pytest.mark.parametrize("model", ["tiny-bitnet", "tiny-llama"])
def test_tl2_repack_matches_numpy_decoder(model):
    """kernels/tl2_repack.py (load path) == gguf/ternary_unpack.py (numpy reference) on bitnet.cpp's TL2 files."""
    from bitnet_py.gguf.constants import TL2_ROWPERM, GGMLType
    from bitnet_py.gguf.reader import GGUFFile
    from bitnet_py.gguf.ternary_unpack import unpack_tl2
    from bitnet_py.gguf.tl2_tiling import resolve_tiling
    from conftest import fixture_path
    from kernels.tl2_repack import tl2_to_i2s_packed
    path = str(fixture_path(model, "ggml-model-tl2.gguf"))
    f = GGUFFile(path)
    infos = [t for t in f.tensors.values() if t.type_id == GGMLType.TL2]
    tiling = resolve_tiling({t.np_shape for t in infos}, f.metadata, path,
                            str(fixture_path("tl2-kernel_config.ini")))
    assert any(t.np_shape[1] % 96 for t in infos)  # two-part tails (K % 96: 64 and 0 bitnet, 64 and 32 llama)
    for t in infos:
        m, k = t.np_shape
        ref, _ = unpack_tl2(f.raw(t.name), m, k, tiling[(m, k)])
        packed = np.full(m * k // 4, 0xAA, np.uint8)
        tl2_to_i2s_packed(f.raw(t.name), m, k, tiling[(m, k)].bm, tiling[(m, k)].bk,
                          np.array(TL2_ROWPERM, np.int64), packed)
        assert np.array_equal(packed, pack_i2s_codes(ref)), t.name


# --- optional int8 head (kernels/dense.py quantize_f16_rows_i8 / i8_matmul) ---

def test_int8_head_quantization_and_matmul_exact():
    from kernels.dense import i8_matmul, quantize_f16_rows_i8
    M, K, T = 77, 2560 + 40, 5  # K not a multiple of 32: SIMD body + scalar tail
    w = (RNG.standard_normal((M, K)) * 0.05).astype(np.float16)
    w[3] = 0  # all-zero row: scale 1
    w[5, 7] = np.inf  # a row holding inf: no finite error bound
    q, scales = np.empty((M, K), np.int8), np.empty(M, np.float32)
    err, w_term, q_norm = np.empty(M, np.float32), np.empty(M, np.float32), np.empty(M, np.float32)
    quantize_f16_rows_i8(w.view(np.uint16), q, scales, err, w_term, q_norm)
    w32 = w.astype(np.float32)
    finite = np.isfinite(w32).all(1)
    w32[~finite] = 0
    ok = np.where(finite)[0]
    ref_scales = np.where(np.abs(w32).max(1) > 0, np.abs(w32).max(1) / np.float32(127), np.float32(1)).astype(
        np.float32)
    assert np.array_equal(scales[ok], ref_scales[ok])
    assert np.array_equal(q[ok], np.rint(w32[ok] / ref_scales[ok, None]).astype(np.int8))
    # the screened head's error terms: upper bounds, and tight ones (float64 reference)
    w64, q64, s64 = w32.astype(np.float64), q.astype(np.float64), scales.astype(np.float64)
    e64 = w64 - s64[:, None] * q64
    assert (np.abs(e64[ok]) <= (0.5 + 2.0 ** -16) * s64[ok, None]).all()  # head_screen.E_MAX
    refs = (np.linalg.norm(e64, axis=1), (K + 8) * 2.0 ** -24 * np.linalg.norm(w64, axis=1),
            s64 * np.linalg.norm(q64, axis=1))
    for got, ref in zip((err, w_term, q_norm), refs):
        assert (got[ok] >= ref[ok]).all() and (got[ok] <= ref[ok] * (1 + 2.0 ** -18)).all()
    assert np.isinf(err[5]) and err[3] == 0
    xq = RNG.integers(-128, 128, size=(T, K)).astype(np.int8)
    xq[0] = -128
    q[0] = -127
    xs = (RNG.random(T) * 50 + 1).astype(np.float32)
    out = np.full((T, M), np.nan, np.float32)
    i8_matmul(q, scales, xq, xs, out)
    dot = xq.astype(np.int64) @ q.astype(np.int64).T
    assert np.array_equal(out, dot.astype(np.float32) * scales[None, :] / xs[:, None])


def test_int8_head_model_close_to_f16():
    from bitnet_py.model import Batch, Model
    from conftest import fixture_path
    path = str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    exact, approx = Model.load(path), Model.load(path, head_type="int8")
    assert approx.weights.output.i8 is not None and approx.weights.output.f16_bits is None
    tokens = np.array([1, 50, 300, 7, 1000, 42], np.int32)
    T = len(tokens)
    logits = []
    for m in (exact, approx):
        kv = m.new_kv_cache(1, 16)
        batch = Batch(tokens, np.arange(T, dtype=np.int32), np.zeros(T, np.int32), np.zeros((1, 1), np.int32),
                      np.arange(T, dtype=np.int32))
        logits.append(m.forward(batch, kv))
    err = np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max()
    assert 0 < err < 0.03  # approximate, but close (int8 weights and activations, per-row scales)
    assert (logits[0].argmax(1) == logits[1].argmax(1)).mean() >= 0.8
    with pytest.raises(ValueError, match="head type"):
        Model.load(path, head_type="int4")


def test_int8_head_in_chunks_equals_one_pass(monkeypatch):
    # the head is quantized in row chunks (peak RSS); chunk edges must not change a single value
    from bitnet_py import screened_head
    from bitnet_py.model import Model
    from conftest import fixture_path
    from kernels.dense import quantize_f16_rows_i8
    path = str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    f16 = Model.load(path).weights.output.f16_bits
    M = f16.shape[0]
    q, rows = np.empty(f16.shape, np.int8), np.empty((4, M), np.float32)
    quantize_f16_rows_i8(f16, q, *rows)
    monkeypatch.setattr(screened_head, "CHUNK_ROWS", 300)  # 2048 rows: 7 chunks, the last one short
    released = []
    head = screened_head.quantize_head(f16, lambda lo, hi: released.append((lo, hi)))
    assert released[0] == (0, 300) and released[-1] == (1800, 2048) and len(released) == 7
    assert np.array_equal(head.q, q) and np.array_equal(head.rows, rows)
    int8 = Model.load(path, head_type="int8").weights.output
    assert np.array_equal(int8.i8, q) and np.array_equal(int8.i8_scales, rows[0])


@pytest.mark.parametrize("round_probs", [False, True])
@pytest.mark.parametrize("D", [64, 128, 72])
@pytest.mark.parametrize("H,KVH", [(8, 2), (6, 2)])  # GQA groups of 4 (register-blocked path) and 3 (generic)
def test_paged_attention_fast(round_probs, D, H, KVH):
    """kernels/attention_fast.py against the numpy reference and against kernels/attention.py."""
    from kernels.attention_fast import paged_attention_fast
    bs, n_blocks = 4, 40
    k_cache = _f16(RNG.standard_normal((n_blocks * bs, KVH, D)).astype(np.float32))
    v_cache = _f16(RNG.standard_normal((n_blocks * bs, KVH, D)).astype(np.float32))
    tables = np.array([list(range(39, -1, -1)), [0, 3, 9] + [-1] * 37], np.int32)
    pos = np.array([0, 9, 150, 159, 6, 11], np.int32)
    seq = np.array([0, 0, 0, 0, 1, 1], np.int32)
    T = len(pos)
    q = _f16(RNG.standard_normal((T, H, D)).astype(np.float32))
    rp = np.array([round_probs, not round_probs])
    scale = np.float32(1 / np.sqrt(D))
    e16, e32 = np.zeros((KVH, 0, D), np.uint16), np.zeros((KVH, 0, D), np.float32)
    outs = {}
    for name, fn in (("fast", paged_attention_fast), ("ref", paged_attention)):
        for use_f32 in (False, True):
            out = np.full_like(q, np.nan)
            k_rows, v_rows = (k_cache, v_cache) if use_f32 else (_bits(k_cache), _bits(v_cache))
            k_heads, v_heads = naive.heads_first(k_rows), naive.heads_first(v_rows)
            args = (e16, e16, k_heads, v_heads) if use_f32 else (k_heads, v_heads, e32, e32)
            fn(q, *args, use_f32, pos, seq, tables, bs, rp, scale, f16_lut(), out)
            outs[name, use_f32] = out
    for use_f32 in (False, True):  # q.k sums in another order; f16-rounded probabilities may flip by 1 ulp
        for t in range(T):
            np.testing.assert_allclose(outs["fast", use_f32][t], outs["ref", use_f32][t], rtol=1e-5,
                                       atol=2e-3 if rp[seq[t]] else 1e-6)
    for t in range(T):
        slots = np.array([tables[seq[t], j // bs] * bs + j % bs for j in range(pos[t] + 1)])
        ref = naive.attention(q[t], k_cache[slots], v_cache[slots], pos[t] + 1, scale, rp[seq[t]])
        np.testing.assert_allclose(outs["fast", False][t], ref, rtol=1e-4, atol=2e-3 if rp[seq[t]] else 2e-5)


def test_expf_nonpositive_within_one_ulp():
    # kernels/expf.py (attention softmax) against exp in float64 over a dense sweep of its domain
    from numba import njit

    from kernels.expf import expf_nonpositive

    @njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = expf_nonpositive(x[i])

    x = np.concatenate([np.linspace(-87.3, 0, 1_000_001, dtype=np.float32),
                        -np.abs(RNG.standard_normal(200_000).astype(np.float32)) * 20,
                        np.float32([0.0, -0.0, -1e-30, -1e-7, -87.29])])
    out = np.empty_like(x)
    run(x, out)
    ok = x >= np.float32(-87.3)
    ref = np.exp(x[ok].astype(np.float64))
    ulps = np.abs(out[ok] - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulps.max() < 1.0 and np.all(out[x == 0] == 1.0)
    below = np.float32([-87.31, -100.0, -1e30, -np.inf])
    out_below = np.empty_like(below)
    run(below, out_below)
    assert out_below.tolist() == [0.0] * 4


@pytest.mark.skipif(not __import__("kernels.simd", fromlist=["HAVE_VNNI"]).HAVE_VNNI,
                    reason="the host has no VNNI (vpdpbusd); the other tests here cover the vpmaddubsw path")
def test_vnni_ternary_dots_use_vpdpbusd_and_stay_exact():
    from numba import njit

    from bitnet_py.gguf.ternary_pack import pack_i2s_codes
    from kernels.simd_vnni import i2s_dot1, i2s_dot4

    @njit(cache=False)
    def dots(packed, q, K, out):
        a, b, c, d = i2s_dot4(packed, 0, q, 0, K, K // 128)
        out[0], out[1], out[2], out[3] = a, b, c, d
        out[4] = i2s_dot1(packed, 0, q, 0, K, K // 128)

    rng = np.random.default_rng(5)
    for K in (128, 384, 2560):
        w = rng.integers(-1, 2, (1, K)).astype(np.int8)
        q = rng.integers(-128, 128, (4, K)).astype(np.int8)
        out = np.zeros(5, np.int64)
        dots(pack_i2s_codes(w), q.reshape(-1), K, out)
        want = ((w[0].astype(np.int64) + 1) * q.astype(np.int64)).sum(axis=1)
        np.testing.assert_array_equal(out[:4], want)
        assert out[4] == want[0]
    assert "vpdpbusd" in "".join(dots.inspect_asm().values())
