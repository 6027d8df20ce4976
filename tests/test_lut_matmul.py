"""The lookup-table ternary matmul (kernels/lut_matmul.py): tables and results exact against numpy."""
import numpy as np
import pytest

import naive
from bitnet_py.gguf.ternary_pack import pack_i2s_codes
from kernels.lut_matmul import build_tables, lut_matmul, lut_matmul_multi

RNG = np.random.default_rng(77)


def test_tables_hold_every_code_pair():
    T, K = 2, 256
    q = RNG.integers(-128, 128, size=(T, K)).astype(np.int8)
    tables = np.empty((T, K // 128 * 1024), np.int16)
    build_tables(q, tables)
    tab = tables.reshape(T, K // 128, 32, 2, 4, 4)  # [t, block, p, half, c0, c1]
    for t in range(T):
        for b in range(K // 128):
            for half in range(2):
                a0 = q[t, b * 128 + 64 * half: b * 128 + 64 * half + 32].astype(np.int16)
                a1 = q[t, b * 128 + 64 * half + 32: b * 128 + 64 * half + 64].astype(np.int16)
                c = np.arange(4, dtype=np.int16)
                ref = c[None, :, None] * a0[:, None, None] + c[None, None, :] * a1[:, None, None]
                assert np.array_equal(tab[t, b, :, half], ref)


@pytest.mark.parametrize("T,M,K", [(1, 1, 128), (2, 31, 256), (5, 33, 384), (3, 70, 2560), (4, 9, 6912),
                                   (17, 40, 640)])
def test_lut_matmul_exact(T, M, K):
    w = RNG.integers(-1, 2, size=(M, K)).astype(np.int8)
    q = RNG.integers(-128, 128, size=(T, K)).astype(np.int8)
    w[0, :] = 1
    q[0, :] = -128  # extreme partial sums
    s = (RNG.random(T) * 100 + 1).astype(np.float32)
    sums = q.astype(np.int32).sum(axis=1).astype(np.int32)
    out = np.full((T, M), np.nan, np.float32)
    lut_matmul(pack_i2s_codes(w), q, s, sums, np.float32(0.0731), out, 0)
    assert np.array_equal(out, naive.ternary_matmul(w, q, s, np.float32(0.0731)))


def test_lut_matmul_multi_exact():
    T, K = 3, 384
    ws = [RNG.integers(-1, 2, size=(m, K)).astype(np.int8) for m in (35, 8, 0)]
    q = RNG.integers(-128, 128, size=(T, K)).astype(np.int8)
    s = (RNG.random(T) * 10 + 1).astype(np.float32)
    sums = q.astype(np.int32).sum(axis=1).astype(np.int32)
    outs = [np.full((T, w.shape[0]), np.nan, np.float32) for w in ws]
    lut_matmul_multi(*[pack_i2s_codes(w) for w in ws], q, s, sums, np.float32(1.5), np.float32(0.5),
                     np.float32(2.0), *outs, 180)  # many-core task sizes
    for w, sc, out in zip(ws, (1.5, 0.5, 2.0), outs):
        assert np.array_equal(out, naive.ternary_matmul(w, q, s, np.float32(sc)))
