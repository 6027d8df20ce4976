"""Q8_K activation quantization and the block-scaled ternary matmul (upstream's TQ1_0/TQ2_0 arithmetic)
against the slow numpy reference of upstream's formulas (tests/parity/q8k_reference.py)."""
import numpy as np
import pytest

from bitnet_py.gguf.ternary_pack import pack_i2s_codes
from kernels.q8k import quantize_q8k, quantize_q8k_parallel, tq_matmul_q8k, tq_matmul_q8k_multi, tq_matmul_q8k_plain
from kernels.simd import HAVE_AVX2
from parity.q8k_reference import quantize_q8_k

RNG = np.random.default_rng(77)


@pytest.mark.parametrize("T,K", [(1, 512), (3, 768), (2, 2560), (9, 512)])
@pytest.mark.parametrize("quantize", [quantize_q8k, quantize_q8k_parallel])
def test_quantize_q8k_exact(T, K, quantize):
    x = RNG.standard_normal((T, K)).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero block
    x[-1, K - 5] = -9.0  # negative extreme in the last block: iscale positive
    q, d = np.empty((T, K), np.int8), np.empty((T, K // 256), np.float32)
    quantize(x, q, d)
    rq, rd = quantize_q8_k(x)
    assert np.array_equal(q.astype(np.int32), rq) and np.array_equal(d, rd)
    assert d[0, 0] == 0 and not q[0, :256].any()


@pytest.mark.parametrize("T,M,K", [(1, 5, 256), (4, 33, 768), (7, 70, 512), (9, 3, 1024), (1, 6, 2560),
                                   (5, 4, 1280)])
@pytest.mark.parametrize("kernel", ["simd", "plain"])
def test_tq_matmul_q8k_matches_reference(T, M, K, kernel):
    """Both kernels bit-exact against upstream's formula: 4-token and single-token paths of the SIMD one (one
    token: groups of four blocks and the blocks after them), row counts that leave a partial task."""
    if kernel == "simd" and not HAVE_AVX2:
        pytest.skip("the SIMD kernel needs AVX2 (tq_matmul_q8k is the plain loop here)")
    w = RNG.integers(-1, 2, size=(M, K)).astype(np.int8)
    bs = (RNG.random((M, K // 256)) * 0.1 + 0.01).astype(np.float32)
    x = RNG.standard_normal((T, K)).astype(np.float32)
    q, d = np.empty((T, K), np.int8), np.empty((T, K // 256), np.float32)
    quantize_q8k(x, q, d)
    out = np.empty((T, M), np.float32)
    (tq_matmul_q8k if kernel == "simd" else tq_matmul_q8k_plain)(pack_i2s_codes(w).reshape(-1), q, d, bs, out, 0)
    ref = np.zeros((T, M), np.float32)
    for b in range(K // 256):
        cols = slice(256 * b, 256 * (b + 1))
        sumi = q[:, cols].astype(np.int64) @ w[:, cols].astype(np.int64).T
        ref = (ref + sumi.astype(np.float32) * (d[:, b][:, None] * bs[:, b][None, :]).astype(np.float32))
    assert np.array_equal(out, ref.astype(np.float32))


@pytest.mark.skipif(not HAVE_AVX2, reason="AVX2 intrinsics (hosts without AVX2 run the plain loops)")
@pytest.mark.parametrize("n_b", [1, 3, 4, 7, 10])
def test_block_dots_against_numpy(n_b):
    """kernels.simd_blocks against numpy, from offsets inside larger arrays, codes 0-3 (3 too, which I2_S never
    writes) against the extreme activations -128 and 127: one token's block sums exact (groups of four blocks and
    the blocks after them, nothing written past them); four tokens' block-scaled float32 sums equal to the
    scalar loop's float32 operations replayed in numpy, block by block."""
    from kernels.simd_blocks import i2s_block_dots1, i2s_block_scaled_dots4
    from numba import njit
    codes = RNG.integers(0, 4, size=n_b * 256).astype(np.uint8)
    codes[:128] = 3  # the largest products
    K, w0, q0, stride = n_b * 256, 64, 3, n_b * 256 + 5  # weights after 64 other bytes; rows of q 5 bytes apart
    c = codes.reshape(-1, 4, 32)  # I2_S bytes (bitnet_py.gguf.ternary_pack), written here as it refuses code 3
    packed = np.concatenate([RNG.integers(0, 256, 64, dtype=np.uint8),
                             ((c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]).reshape(-1)])
    q = RNG.integers(-128, 128, size=q0 + 4 * stride, dtype=np.int64).astype(np.int8)
    rows = [q[q0 + t * stride:q0 + t * stride + K] for t in range(4)]
    rows[0][:128] = np.where(np.arange(128) % 2, 127, -128)  # codes 3 against both extremes
    dots = np.array([[int(np.dot(codes[256 * b:256 * (b + 1)].astype(np.int64), r[256 * b:256 * (b + 1)]))
                      for r in rows] for b in range(n_b)])  # [n_b, 4]
    q_sums = RNG.integers(-3000, 3000, size=4 * n_b).astype(np.int32)  # block-major [n_b, 4]
    d_x = (RNG.random(4 * n_b) * 0.01 + 1e-4).astype(np.float32)
    scales = (RNG.random(n_b + 9) * 0.1 + 0.01).astype(np.float32)  # this row's from s0 = 9

    @njit
    def call(packed, q, sums, q_sums, d_x, scales):
        i2s_block_dots1(packed, w0, q, q0, stride, n_b, sums)
        return i2s_block_scaled_dots4(packed, w0, q, q0, stride, n_b, q_sums, d_x, scales, 9)

    sums = np.full(n_b + 3, -7, np.int32)
    got = call(packed, q, sums, q_sums, d_x, scales)
    assert np.array_equal(sums[:n_b], dots[:, 0]) and (sums[n_b:] == -7).all()
    want = np.zeros(4, np.float32)
    for b in range(n_b):
        sb = scales[9 + b]
        for t in range(4):
            want[t] += np.float32(dots[b, t] - q_sums[4 * b + t]) * np.float32(d_x[4 * b + t] * sb)
    assert np.array_equal(np.array(got, np.float32), want)


@pytest.mark.parametrize("T,Ms,K", [(1, (40, 8, 8), 512), (6, (33, 70), 768), (9, (5, 3, 64), 256)])
@pytest.mark.parametrize("n_threads", [2, 180])  # task sizes for 2 threads; for 180 (8-32 rows)
def test_tq_matmul_q8k_multi_equals_separate_calls(T, Ms, K, n_threads):
    """Two or three block-scaled weights in one parallel region: each output bit-identical to its own call."""
    ws = [RNG.integers(-1, 2, size=(M, K)).astype(np.int8) for M in Ms]
    scales = [(RNG.random((M, K // 256)) * 0.1 + 0.01).astype(np.float32) for M in Ms]
    q, d = np.empty((T, K), np.int8), np.empty((T, K // 256), np.float32)
    quantize_q8k(RNG.standard_normal((T, K)).astype(np.float32), q, d)
    packed = [pack_i2s_codes(w).reshape(-1) for w in ws]
    outs = [np.empty((T, M), np.float32) for M in Ms]
    if len(Ms) == 2:
        args = (*packed, np.zeros(0, np.uint8), q, d, *scales, np.zeros((0, K // 256), np.float32), *outs,
                np.empty((T, 0), np.float32))
    else:
        args = (*packed, q, d, *scales, *outs)
    tq_matmul_q8k_multi(*args, n_threads)
    for p, s, o in zip(packed, scales, outs):
        alone = np.empty_like(o)
        tq_matmul_q8k_plain(p, q, d, s, alone, 0)
        assert np.array_equal(o, alone)


def test_tq2_0_model_fused_and_unfused_logits_identical(tmp_path, monkeypatch):
    """The forward runs q/k/v and gate/up of TQ2_0 weights as one quantization and one parallel region each:
    logits (a 9-token prefill, then a one-token step) bit-identical to separate matmuls."""
    from bitnet_py.convert import convert
    from bitnet_py.model import Batch, Model
    from conftest import fixture_path
    from kernels import config as kernel_config
    path = tmp_path / "tq2_0.gguf"
    convert(str(fixture_path("tiny-bitnet", "hf")), "tq2_0", str(path), progress=False)

    def run(model):
        kv = model.new_kv_cache(1, 16)
        out = []
        for start, n in ((0, 9), (9, 1)):
            pos = np.arange(start, start + n, dtype=np.int32)
            out.append(model.forward(Batch(tokens=pos + 5, positions=pos, seq_index=np.zeros(n, np.int32),
                                           block_tables=np.zeros((1, 1), np.int32),
                                           logit_rows=np.arange(n, dtype=np.int32)), kv))
        return out

    fused = Model.load(str(path))
    assert all(fused._fuse_qkv) and all(fused._fuse_ffn)
    monkeypatch.setattr(kernel_config, "FUSE", False)
    separate = Model.load(str(path))
    assert not any(separate._fuse_qkv)
    for a, b in zip(run(fused), run(separate)):
        np.testing.assert_array_equal(a, b)
