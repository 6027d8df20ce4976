"""TL2 bytes -> I2_S-packed bytes at load time (the kernels only read the I2_S layout).

Same decoding as `bitnet_py.gguf.ternary_unpack.unpack_tl2` (layout in ../shared/fixtures/README.md), written
as loops so that a 2B-4T file repacks in about a second instead of minutes of numpy fancy indexing.
"""
import numpy as np
from numba import njit, prange

from .config import JIT_PARALLEL


@njit(**JIT_PARALLEL)
def tl2_decode(raw, m, k, bm, bk, rowperm, w):
    """raw: u8 TL2 region; rowperm: i64[4]; -> w: i8[m, k] ternary values. Row tiles split over threads."""
    three_k = (k // bk) * bk
    two_k = k - three_k
    g_n = bm // 32
    mb_n = m // bm
    kb_n = three_k // bk
    t_n = bk // 6
    q_n = bk // 24
    sign_off = m * three_k // 6
    two_off = sign_off + m * three_k // 24
    for mb in prange(mb_n):
        for g in range(g_n):
            for r in range(32):
                row = mb * bm + g * 32 + rowperm[r // 8] * 8 + r % 8
                rr = rowperm[r // 8] * 8 + r % 8  # natural row within the 32-row group (sign layout)
                for kb in range(kb_n):
                    tile = (mb * kb_n + kb) * g_n + g
                    for t in range(t_n):
                        byte = np.int32(raw[(tile * t_n + t) * 32 + r])
                        for half in range(2):
                            v = (byte >> 4) if half == 0 else (byte & 15)
                            triple = 2 * t + half
                            qq = triple // 8
                            i = 2 * (triple % 8) + rr // 16
                            c = rr % 16
                            o = sign_off + (tile * q_n + qq) * 32 + 2 * c
                            u16 = np.int32(raw[o]) | (np.int32(raw[o + 1]) << 8)
                            neg = (u16 >> (15 - i)) & 1
                            w0 = (v + 13) // 9 - 1
                            rest = v - 9 * w0
                            w1 = (rest + 4) // 3 - 1
                            w2 = rest - 3 * w1
                            if neg:
                                w0, w1, w2 = -w0, -w1, -w2
                            col = kb * bk + 3 * triple
                            w[row, col] = w0
                            w[row, col + 1] = w1
                            w[row, col + 2] = w2
                for kb2 in range(two_k // 32):
                    for t in range(8):
                        byte = np.int32(raw[two_off + (((mb * (two_k // 32) + kb2) * g_n + g) * 8 + t) * 32 + r])
                        for half in range(2):
                            v = (byte >> 4) if half == 0 else (byte & 15)
                            w0 = v // 3 - 1
                            w1 = v - 3 * (w0 + 1) - 1
                            col = three_k + kb2 * 32 + 2 * (2 * t + half)
                            w[row, col] = w0
                            w[row, col + 1] = w1


@njit(**JIT_PARALLEL)
def pack_i2s(w, out):
    """w: i8[m, k] ternary (k % 128 == 0) -> out: u8[m*k/4] in I2_S layout."""
    m, k = w.shape
    for row in prange(m):
        for b in range(k // 128):
            o = (row * k + b * 128) // 4
            for p in range(32):
                c0 = np.uint8(w[row, b * 128 + p] + 1)
                c1 = np.uint8(w[row, b * 128 + 32 + p] + 1)
                c2 = np.uint8(w[row, b * 128 + 64 + p] + 1)
                c3 = np.uint8(w[row, b * 128 + 96 + p] + 1)
                out[o + p] = (c0 << 6) | (c1 << 4) | (c2 << 2) | c3
