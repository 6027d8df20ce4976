"""The base-3 ternary layout (kernels/b3_simd.py) and its matmuls (kernels/b3_matmul.py): the layout against its
documented numpy form, the kernels against the naive matmul bit for bit, and models loaded in it against the same
models in I2_S's layout."""
import numpy as np
import pytest

import naive
from bitnet_py.gguf.ternary_pack import pack_i2s_codes
from bitnet_py.model import Batch, Model
from conftest import fixture_path, run_fresh_python
from test_screened_head import BUNDLED
from kernels.b3_simd import HAVE_B3, SB_K, b3_bytes, pack_b3_from_i2s

needs_b3 = pytest.mark.skipif(not HAVE_B3, reason="the host has no AVX-512 VBMI + VNNI (or BITNET_PY_B3=0)")
RNG = np.random.default_rng(7)


def b3_reference(w: np.ndarray) -> np.ndarray:
    """The layout as kernels/b3_simd.py documents it, in numpy: w i8[M, K] ternary -> u8[M Kp / 5]."""
    M, K = w.shape
    kp = -(-K // SB_K) * SB_K
    codes = np.zeros((M, kp), np.int64)
    codes[:, :K] = w + 1
    # [row tile r, row n, super-block s, tile i, line z, j] with K = 320 s + 64 i + 4 z + j, row = 16 r + n
    c = codes.reshape(M // 16, 16, kp // SB_K, 5, 16, 4).transpose(0, 2, 3, 4, 1, 5)  # [r, s, i, z, n, j]
    c = c.reshape(M // 16, kp // SB_K, 5, 1024)  # byte b = 64 z + 4 n + j of tile i
    v = (c[:, :, :4] * (3 ** np.arange(4))[None, None, :, None]).sum(axis=2)
    c4 = c[:, :, 4]
    return np.where(c4 == 0, v, np.where(c4 == 1, 81 + v, 162 + (v + 47) % 81)).astype(np.uint8).reshape(-1)


def _packed(w):
    out = np.empty(b3_bytes(*w.shape), np.uint8)
    assert pack_b3_from_i2s(pack_i2s_codes(w), w.shape[0], w.shape[1], out) == 0
    return out


@pytest.mark.parametrize("M,K", [(16, 128), (32, 384), (48, 2560), (16, 6912)])
def test_repack_from_i2s_matches_the_documented_layout(M, K):
    w = RNG.integers(-1, 2, (M, K)).astype(np.int8)
    assert np.array_equal(_packed(w), b3_reference(w))
    assert b3_bytes(M, K) == M * (-(-K // SB_K) * SB_K) // 5


def test_a_code_outside_the_ternary_values_is_reported():
    w = RNG.integers(-1, 2, (32, 256)).astype(np.int8)
    packed = pack_i2s_codes(w).copy()
    packed[32 * 256 // 4 - 1] |= 3  # row 31's last byte: a code 3 in row tile 1
    assert pack_b3_from_i2s(packed, 32, 256, np.empty(b3_bytes(32, 256), np.uint8)) == 1


def _case(T, M, K, extreme):
    w = RNG.integers(-1, 2, (M, K)).astype(np.int8)
    q = RNG.integers(-128, 128, (T, K)).astype(np.int8)
    if extreme:  # the largest sums, and the scaled accumulators' (codes 2 << 6) largest terms
        w[0], q[0] = 1, -128
        w[1] = -1
        if T > 1:
            q[1] = 127
    s = (RNG.random(T) * 100 + 1).astype(np.float32)
    return w, q, s, q.astype(np.int32).sum(axis=1).astype(np.int32)


@needs_b3
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 7, 16, 17, 33])
@pytest.mark.parametrize("M,K", [(16, 128), (48, 384), (32, 2560), (64, 6912)])
@pytest.mark.parametrize("n_threads", [0, 2])
def test_b3_matmul_is_exact(T, M, K, n_threads):
    from kernels.b3_matmul import b3_matmul
    w, q, s, sums = _case(T, M, K, extreme=True)
    out = np.full((T, M), np.nan, np.float32)
    b3_matmul(_packed(w), q, s, sums, np.float32(0.0731), out, n_threads)
    assert np.array_equal(out, naive.ternary_matmul(w, q, s, np.float32(0.0731)))


@needs_b3
@pytest.mark.parametrize("T", [1, 6, 20])
def test_b3_matmul_multi_is_exact(T):
    from kernels.b3_matmul import b3_matmul_multi
    K = 640
    ws = [RNG.integers(-1, 2, (m, K)).astype(np.int8) for m in (64, 16, 48)]
    _, q, s, sums = _case(T, 16, K, extreme=False)
    outs = [np.full((T, w.shape[0]), np.nan, np.float32) for w in ws]
    scales = [np.float32(x) for x in (0.5, 1.5, 2.5)]
    b3_matmul_multi(*[_packed(w) for w in ws], q, s, sums, *scales, *outs, 2)
    for w, sc, out in zip(ws, scales, outs):
        assert np.array_equal(out, naive.ternary_matmul(w, q, s, sc))
    two = [np.full((T, 64), np.nan, np.float32), np.full((T, 16), np.nan, np.float32)]
    b3_matmul_multi(_packed(ws[0]), _packed(ws[1]), np.empty(0, np.uint8), q, s, sums, scales[0], scales[1],
                    np.float32(0), *two, np.empty((T, 0), np.float32), 2)
    assert np.array_equal(two[1], naive.ternary_matmul(ws[1], q, s, scales[1]))


@needs_b3
def test_b3_dots_compile_to_byte_permutes_and_512_bit_dots():
    from numba import njit

    from kernels.b3_simd import b3_dots1
    fresh = njit(cache=False)(lambda p, q, s: b3_dots1(p, 0, q, 0, 0, 16, s, 0))
    w = RNG.integers(-1, 2, (16, 256)).astype(np.int8)  # one super-block: K padded to 320 with zero activations
    q = np.zeros(320, np.int8)
    q[:256] = RNG.integers(-128, 128, 256)
    sums = np.zeros(16, np.int32)
    fresh(_packed(w), q, sums)
    assert np.array_equal(sums, (w.astype(np.int64) + 1) @ q[:256])
    asm = "".join(fresh.inspect_asm().values())
    assert ("vpermi2b" in asm or "vpermt2b" in asm) and "vpdpbusd" in asm and "zmm" in asm


def _logits(model, tokens):
    T = len(tokens)
    kv = model.new_kv_cache(4, 16)
    batch = Batch(np.array(tokens, np.int32), np.arange(T, dtype=np.int32), np.zeros(T, np.int32),
                  np.arange(4, dtype=np.int32).reshape(1, 4), np.arange(T, dtype=np.int32))
    return model.forward(batch, kv)


@needs_b3
@pytest.mark.parametrize("path", [fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"),
                                  fixture_path("tiny-bitnet", "ggml-model-tl2.gguf"), BUNDLED])
def test_models_in_the_base3_layout_compute_the_i2s_logits(path, monkeypatch):
    # decode-sized steps take kernels.layer_steps with the base-3 matmuls, longer ones the general path (AMX
    # tiles from 16 tokens where the host has them); the reference loads the same file in I2_S's layout. The
    # bundled model's K = 384 pads to 640 (the fixtures' 256 to 320, as many bytes per row as I2_S's)
    import bitnet_py.weights as weights
    b3 = Model.load(str(path))
    assert {w.layout for L in b3.weights.layers for w in (L.wq, L.w_gate, L.w_down)} == {"b3"}
    assert b3._steps is not None
    monkeypatch.setattr(weights, "use_b3", lambda m, k: False)
    monkeypatch.setattr(weights, "b3_enabled", lambda: False)
    i2s = Model.load(str(path))
    assert i2s.weights.layers[0].wq.layout == "i2_s"
    for tokens in ([1], [1, 50, 300, 7, 1000, 42], list(range(3, 23))):
        assert np.array_equal(_logits(b3, tokens), _logits(i2s, tokens))


@needs_b3
def test_base3_weights_are_cached_and_mapped_by_the_next_load(tmp_path, monkeypatch):
    import mmap
    import shutil

    from test_repack_cache import memory_owner
    model = tmp_path / "m.gguf"
    shutil.copy(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"), model)
    monkeypatch.setenv("BITNET_PY_REPACK_CACHE", "1")
    monkeypatch.setenv("BITNET_PY_CACHE", str(tmp_path / "cache"))
    first = Model.load(str(model), screen_head=False)
    second = Model.load(str(model), screen_head=False)
    w1, w2 = first.weights.layers[1].w_down, second.weights.layers[1].w_down
    assert w2.layout == "b3" and isinstance(memory_owner(w2.packed), mmap.mmap)
    assert memory_owner(w2.packed) is not memory_owner(w1.packed) and np.array_equal(w1.packed, w2.packed)
    assert np.array_equal(_logits(first, [5, 6, 7]), _logits(second, [5, 6, 7]))


def test_b3_switch_keeps_i2s_with_its_own_cache_folder():
    run_fresh_python("from kernels import b3_simd, config, layer_steps\n"
                     "from bitnet_py.weights import b3_enabled\n"
                     "assert not b3_simd.HAVE_B3 and not b3_enabled() and layer_steps.TERNARY_KERNEL == 'simd'\n"
                     "assert config.CACHE_DIR.endswith('-nob3'), config.CACHE_DIR\n", BITNET_PY_B3="0")
