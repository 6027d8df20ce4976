"""kernels/amx.py: the AMX prefill path of the I2_S matmuls against numpy (exact integers, so the same bits), its
tile layouts against their documented numpy forms, and the switch that turns it off."""
import numpy as np
import pytest

import naive
from bitnet_py.gguf.ternary_pack import pack_i2s_codes
from conftest import run_fresh_python
from kernels.amx import HAVE_AMX

needs_amx = pytest.mark.skipif(not HAVE_AMX, reason="the host has no AMX-INT8 + AVX-512 VBMI (or BITNET_PY_AMX=0)")
RNG = np.random.default_rng(1158)


def _tile_order(K):
    """Position i of the tiles' K order -> the K index it holds (kernels/amx.py's docstring, written out)."""
    order = []
    for c in range(K // 64):
        k0 = (c // 2) * 128 + 16 * (c % 2)
        order += [k0 + r + 32 * j for r in range(16) for j in range(4)]
    return np.array(order)


@needs_amx
@pytest.mark.parametrize("T", [16, 17, 40, 128])
@pytest.mark.parametrize("M,K", [(48, 128), (40, 256), (80, 2560)])
def test_i2s_matmul_on_amx_tiles_equals_numpy(T, M, K):
    """Tokens in whole and partial tiles, rows in whole groups of 16 and a tail (the SIMD rows), activations at
    both int8 extremes."""
    from kernels.ternary_matmul import _amx_inputs, i2s_matmul, i2s_matmul_multi
    w = RNG.integers(-1, 2, (M, K)).astype(np.int8)
    q = RNG.integers(-128, 128, (T, K)).astype(np.int8)
    q[0, :] = 127
    q[-1, :] = -128
    s = RNG.uniform(0.5, 2.0, T).astype(np.float32)
    sums = q.astype(np.int64).sum(axis=1).astype(np.int32)
    assert _amx_inputs(q)[0].shape[0] == (T + 15) // 16 * 16  # the tiles are used
    want = naive.ternary_matmul(w, q, s, np.float32(0.37))
    for n_threads in (0, 2, 7):
        out = np.full((T, M), np.nan, np.float32)
        i2s_matmul(pack_i2s_codes(w), q, s, sums, np.float32(0.37), out, n_threads)
        np.testing.assert_array_equal(out, want)
    w2 = RNG.integers(-1, 2, (M // 2, K)).astype(np.int8)
    o1, o2 = np.full((T, M), np.nan, np.float32), np.full((T, M // 2), np.nan, np.float32)
    i2s_matmul_multi(pack_i2s_codes(w), pack_i2s_codes(w2), np.empty(0, np.uint8), q, s, sums, np.float32(0.37),
                     np.float32(1.5), np.float32(1.0), o1, o2, np.empty((T, 0), np.float32), 2)
    np.testing.assert_array_equal(o1, want)
    np.testing.assert_array_equal(o2, naive.ternary_matmul(w2, q, s, np.float32(1.5)))


@needs_amx
def test_tiles_hold_the_documented_layouts():
    from kernels.amx import _unpack_codes, permute_activations
    K = 384
    q = RNG.integers(-128, 128, (5, K)).astype(np.int8)
    qp = permute_activations(q)
    assert qp.shape == (16, K)
    np.testing.assert_array_equal(qp[:5], q[:, _tile_order(K)])
    np.testing.assert_array_equal(qp[5:], 0)
    w = RNG.integers(-1, 2, (32, K)).astype(np.int8)
    codes = np.zeros((K // 64, 16, 64), np.uint8)
    _unpack_codes(pack_i2s_codes(w), 16, K // 4, codes)  # rows 16-31
    order = _tile_order(K).reshape(K // 64, 16, 4)  # [chunk, B row, field]
    want = (w[16:32][:, order] + 1).transpose(1, 2, 0, 3).reshape(K // 64, 16, 64)  # [chunk, row r, 4 n + j]
    np.testing.assert_array_equal(codes, want)


@needs_amx
def test_amx_kernel_is_compiled_to_tile_instructions():
    from numba import njit

    from kernels.amx import i2s_rows_amx, tile_config_bytes
    fresh = njit(cache=False)(i2s_rows_amx.py_func)  # compiled here: the cached kernel has no assembly to show
    out = np.zeros((16, 16), np.float32)
    fresh(np.zeros(16 * 32, np.uint8), np.zeros((16, 128), np.int8), 16, np.ones(16, np.float32),
          np.zeros(16, np.int32), np.float32(1.0), out, 0, 16, tile_config_bytes())
    asm = "".join(fresh.inspect_asm().values())
    assert "tdpbsud" in asm and "ldtilecfg" in asm and "tilerelease" in asm
    assert (out == 0).all()
    from kernels.amx import _unpack_codes
    unpack = njit(cache=False)(_unpack_codes.py_func)
    unpack(np.zeros(16 * 32, np.uint8), 0, 32, np.zeros((2, 16, 64), np.uint8))
    assert "vpmultishiftqb" in "".join(unpack.inspect_asm().values())


def test_amx_switch_turns_the_tiles_off_with_their_own_cache_folder():
    run_fresh_python("import numpy as np\n"
                     "from kernels import amx, config, ternary_matmul\n"
                     "assert not amx.HAVE_AMX\n"
                     "assert ternary_matmul._amx_inputs(np.zeros((32, 128), np.int8))[0].shape[0] == 0\n"
                     "assert config.CACHE_DIR.endswith('-noamx'), config.CACHE_DIR\n", BITNET_PY_AMX="0")
