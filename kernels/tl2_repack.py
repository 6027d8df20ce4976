"""TL2 and TQ2_0 bytes (and decoded ternary matrices) -> I2_S-packed bytes at load time (the kernels only read
I2_S).

Same decoding as `bitnet_py.gguf.ternary_unpack.unpack_tl2` (layout in ../shared/fixtures/README.md), written
as loops: one task per 32-row group of a row tile, each row decoded into a row buffer (nibbles through 16-entry
tables, each 16-bit sign word read once for its 8 triples) and packed straight away, so no int8 copy of the
whole matrix is made. A 2B-4T file repacks in about a second.
"""
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL


@njit(**JIT)
def _pack_row(w_row, out, o0):
    """w_row: i8[K] ternary (K % 128 == 0) -> out[o0 : o0 + K/4] in I2_S layout (code = w + 1; in each 32-byte
    block, byte p holds values p, p+32, p+64, p+96 at shifts 6, 4, 2, 0)."""
    for b in range(w_row.shape[0] // 128):
        for p in range(32):
            c0 = np.uint8(w_row[b * 128 + p] + 1)
            c1 = np.uint8(w_row[b * 128 + 32 + p] + 1)
            c2 = np.uint8(w_row[b * 128 + 64 + p] + 1)
            c3 = np.uint8(w_row[b * 128 + 96 + p] + 1)
            out[o0 + b * 32 + p] = (c0 << 6) | (c1 << 4) | (c2 << 2) | c3


@njit(**JIT_PARALLEL)
def pack_i2s(w, out):
    """w: i8[m, k] ternary (k % 128 == 0) -> out: u8[m*k/4] in I2_S layout (TQ1_0 / TQ2_0 load path)."""
    m, k = w.shape
    for row in prange(m):
        _pack_row(w[row], out, row * (k // 4))


@njit(**JIT)
def _nibble_tables():
    """-> (i8[2, 16, 3], i8[16, 2]): weights of a three-weight nibble (base-3 digits with an offset), without
    and with the sign bit applied, and of a two-weight nibble."""
    three = np.zeros((2, 16, 3), np.int8)
    two = np.zeros((16, 2), np.int8)
    for v in range(16):
        w0 = (v + 13) // 9 - 1
        rest = v - 9 * w0
        w1 = (rest + 4) // 3 - 1
        three[0, v, 0], three[0, v, 1], three[0, v, 2] = w0, w1, rest - 3 * w1
        three[1, v, 0], three[1, v, 1], three[1, v, 2] = -w0, -w1, -(rest - 3 * w1)
        u0 = v // 3 - 1
        two[v, 0], two[v, 1] = u0, v - 3 * (u0 + 1) - 1
    return three, two


@njit(**JIT_PARALLEL)
def tl2_to_i2s_packed(raw, m, k, bm, bk, rowperm, out):
    """raw: u8 TL2 region of an m x k weight tiled BM x BK; rowperm: i64[4] -> out: u8[m*k/4] in I2_S layout
    (k % 128 == 0). One task per 32-row group."""
    three_k = (k // bk) * bk
    two_k = k - three_k
    g_n = bm // 32
    kb_n = three_k // bk
    t_n = bk // 6  # bytes per row and tile: two 3-weight nibbles each
    q_n = bk // 24  # sign words per row and tile: 8 triples (4 bytes) each
    sign_off = m * three_k // 6
    two_off = sign_off + m * three_k // 24
    three, two = _nibble_tables()
    for task in prange((m // bm) * g_n):
        mb, g = task // g_n, task % g_n
        w_row = np.empty(k, np.int8)
        for r in range(32):
            rr = rowperm[r // 8] * 8 + r % 8  # natural row within the 32-row group
            for kb in range(kb_n):
                tile = (mb * kb_n + kb) * g_n + g
                for qq in range(q_n):
                    o = sign_off + (tile * q_n + qq) * 32 + 2 * (rr % 16)
                    # bit 15 - (2 * triple' + rr // 16) of the sign word belongs to triple' of these 8
                    signs = (np.int32(raw[o]) | (np.int32(raw[o + 1]) << 8)) >> (1 - rr // 16)
                    base = kb * bk + 24 * qq
                    for tt in range(4):
                        byte = np.int32(raw[(tile * t_n + qq * 4 + tt) * 32 + r])
                        hi, lo = byte >> 4, byte & 15
                        neg_hi = (signs >> (14 - 4 * tt)) & 1
                        neg_lo = (signs >> (12 - 4 * tt)) & 1
                        col = base + 6 * tt
                        w_row[col] = three[neg_hi, hi, 0]
                        w_row[col + 1] = three[neg_hi, hi, 1]
                        w_row[col + 2] = three[neg_hi, hi, 2]
                        w_row[col + 3] = three[neg_lo, lo, 0]
                        w_row[col + 4] = three[neg_lo, lo, 1]
                        w_row[col + 5] = three[neg_lo, lo, 2]
            for kb2 in range(two_k // 32):
                for t in range(8):
                    byte = np.int32(raw[two_off + (((mb * (two_k // 32) + kb2) * g_n + g) * 8 + t) * 32 + r])
                    for half in range(2):
                        v = (byte >> 4) if half == 0 else (byte & 15)
                        col = three_k + kb2 * 32 + 2 * (2 * t + half)
                        w_row[col] = two[v, 0]
                        w_row[col + 1] = two[v, 1]
            _pack_row(w_row, out, (mb * bm + g * 32 + rr) * (k // 4))


TQ2_0_BLOCK_BYTES = 66  # 256 values: qs[64] (2-bit codes), then an f16 scale


@njit(**JIT_PARALLEL)
def tq2_0_to_i2s_packed(raw, n_blocks, out, scale_bits):
    """raw: u8 TQ2_0 bytes (n_blocks blocks of 256 values, row-major) -> out: u8[n_blocks * 64] in I2_S layout,
    scale_bits: u16[n_blocks] (the blocks' f16 scales). In a TQ2_0 block, value 128h + 32l + j sits in byte
    32h + j at shift 2l with code = value + 1, as in I2_S; I2_S keeps the same four values of byte 32h + j at
    shifts 6, 4, 2, 0: the byte's four 2-bit fields in reverse order, so each byte maps through one table."""
    table = np.empty(256, np.uint8)
    for v in range(256):
        table[v] = ((v & 3) << 6) | (((v >> 2) & 3) << 4) | (((v >> 4) & 3) << 2) | ((v >> 6) & 3)
    for blk in prange(n_blocks):
        src = blk * TQ2_0_BLOCK_BYTES
        for i in range(64):
            out[blk * 64 + i] = table[raw[src + i]]
        scale_bits[blk] = np.uint16(raw[src + 64]) | (np.uint16(raw[src + 65]) << 8)
