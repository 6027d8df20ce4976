"""Numpy decoders for the ternary weight types: bytes -> int8 ternary codes [M, K] and scales.

Layouts are documented in ../shared/fixtures/README.md (I2_S, TL2) and upstream ggml (TQ1_0, TQ2_0).
These are load-time (and test-reference) paths, vectorized numpy, no per-element Python loops.
"""
from __future__ import annotations

import numpy as np

from .constants import TL2_ROWPERM
from .tl2_tiling import TL2Tile


def i2s_scale(raw: np.ndarray, m: int, k: int) -> np.float32:
    """The per-tensor f32 scale stored right after the M*K/4 packed bytes."""
    return raw[m * k // 4:m * k // 4 + 4].view("<f4")[0]


def unpack_i2s(raw: np.ndarray, m: int, k: int) -> tuple[np.ndarray, np.float32]:
    """I2_S bytes -> (int8 ternary [m, k], scale). Byte p of each 32-byte block holds values
    p, p+32, p+64, p+96 of that 128-value block in bits 7-6, 5-4, 3-2, 1-0; code c means c - 1."""
    n = m * k
    packed = raw[:n // 4].reshape(-1, 32)  # [n/128 blocks, 32]
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8)
    codes = (packed[:, None, :] >> shifts[None, :, None]) & 3  # [blocks, 4 groups, 32]
    w = codes.reshape(m, k).astype(np.int8) - 1
    return w, i2s_scale(raw, m, k)


def _tl2_three_table() -> np.ndarray:
    """[14, 3] int8: three-part nibble -> (w0, w1, w2) with 9*w0 + 3*w1 + w2 = nibble."""
    t = np.zeros((14, 3), dtype=np.int8)
    for v in range(14):
        w0 = (v + 13) // 9 - 1
        rest = v - 9 * w0
        w1 = (rest + 4) // 3 - 1
        w2 = rest - 3 * w1
        t[v] = (w0, w1, w2)
    return t


_TL2_THREE = _tl2_three_table()


def tl2_region(m: int, k: int) -> int:
    nb = (k - 256) * m // 3 * 5 // 8 + 256 * m // 2 * 4 // 8
    return (nb + 31) // 32 * 32


def unpack_tl2(raw: np.ndarray, m: int, k: int, tile: TL2Tile) -> tuple[np.ndarray, np.float32]:
    """TL2 bytes -> (int8 ternary [m, k], scale), given the tiling the file was packed with."""
    bm, bk = tile.bm, tile.bk
    if m % bm or bm % 32 or bk % 24:
        raise ValueError(f"TL2 tiling BM={bm}, BK={bk} does not fit weight {m}x{k}")
    three_k = (k // bk) * bk
    two_k = k - three_k
    g_n = bm // 32
    mb_n = m // bm
    rowperm = np.array(TL2_ROWPERM)
    # row index of byte r in group g of tile mb (index and two-part layouts)
    r = np.arange(32)
    row_in_g = rowperm[r // 8] * 8 + r % 8  # [32]
    rows = (np.arange(mb_n)[:, None, None] * bm + np.arange(g_n)[None, :, None] * 32
            + row_in_g[None, None, :])  # [mb, g, 32]
    w = np.zeros((m, k), dtype=np.int8)
    off = 0
    if three_k:
        kb_n = three_k // bk
        t_n = bk // 6
        n_idx = m * three_k // 6
        idx = raw[off:off + n_idx].reshape(mb_n, kb_n, g_n, t_n, 32)
        off += n_idx
        nib = np.stack([idx >> 4, idx & 15], axis=4)  # [mb, kb, g, t, 2, 32]: triple 2t+nib
        n_sign = m * three_k // 24
        sign_bytes = raw[off:off + n_sign].reshape(mb_n, kb_n, g_n, bk // 24, 32)
        off += n_sign
        u16 = sign_bytes.copy().view("<u2").astype(np.uint32)  # [mb, kb, g, q, 16 c]
        bits = (u16[..., None, :] >> (15 - np.arange(16))[:, None]) & 1  # [mb, kb, g, q, 16 i, 16 c]
        # bit i of uint16 c -> triple 8q + i//2, row 16*(i%2) + c within the group of 32 rows
        bits = bits.reshape(mb_n, kb_n, g_n, bk // 24, 8, 2, 16)  # [.., q, i//2, i%2, c]
        sign = bits.transpose(0, 1, 2, 3, 4, 5, 6).reshape(mb_n, kb_n, g_n, bk // 3, 32)  # [.., triple, row32]
        trip = nib.reshape(mb_n, kb_n, g_n, t_n * 2, 32)  # [.., triple, byte r]
        vals = _TL2_THREE[trip]  # [mb, kb, g, triple, r, 3]
        # sign is indexed by natural row (16*(i%2)+c); map it to byte order r via row_in_g
        sign_r = sign[..., row_in_g]  # [mb, kb, g, triple, r]
        vals = np.where(sign_r[..., None] == 1, -vals, vals)
        # columns: kb*bk + 3*triple + j ; rows: rows[mb, g, r]
        vals = vals.transpose(0, 2, 4, 1, 3, 5).reshape(mb_n, g_n, 32, three_k)
        w[rows.reshape(-1), :three_k] = vals.reshape(m, three_k)
    if two_k:
        kb2_n = two_k // 32
        n_two = m * two_k // 4
        two = raw[off:off + n_two].reshape(mb_n, kb2_n, g_n, 8, 32)
        nib = np.stack([two >> 4, two & 15], axis=4).astype(np.int8)  # [mb, kb2, g, t, 2, r] pair 2t+nib
        w0 = (nib // 3) - 1  # nibble = 3*w0 + w1 + 4
        w1 = nib - 3 * (w0 + 1) - 1
        pairs = np.stack([w0, w1], axis=-1).reshape(mb_n, kb2_n, g_n, 16, 32, 2)  # [.., pair, r, 2]
        pairs = pairs.transpose(0, 2, 4, 1, 3, 5).reshape(mb_n, g_n, 32, two_k)
        w[rows.reshape(-1), three_k:] = pairs.reshape(m, two_k)
    scale = raw[tl2_region(m, k):tl2_region(m, k) + 4].view("<f4")[0]
    return w, scale


def unpack_tq2_0(raw: np.ndarray, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ2_0 -> (int8 ternary [m, k], f32 block scales [m, k/256]). Block: qs[64] then f16 d; value
    index 128*h + 32*l + j is in qs[32*h + j] at bit shift 2*l."""
    blocks = raw[:m * k // 256 * 66].reshape(-1, 66)
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    w = ((qs >> shifts) & 3).astype(np.int8).reshape(m, k) - 1
    d = blocks[:, 64:66].copy().view("<f2").astype(np.float32).reshape(m, k // 256)
    return w, d


def unpack_tq1_0(raw: np.ndarray, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 -> (int8 ternary [m, k], f32 block scales [m, k/256]). Block: qs[48], qh[4], f16 d; base-3
    digits extracted as ((q * 3^n mod 256) * 3) >> 8."""
    blocks = raw[:m * k // 256 * 54].reshape(-1, 54)
    pow3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)

    def digits(b: np.ndarray, n: int) -> np.ndarray:  # b [nb, L] -> [nb, n, L]
        q = (b[:, None, :].astype(np.uint16) * pow3[None, :n, None]) & 255
        return ((q * 3) >> 8).astype(np.int8) - 1

    part1 = digits(blocks[:, 0:32], 5).reshape(-1, 160)
    part2 = digits(blocks[:, 32:48], 5).reshape(-1, 80)
    part3 = digits(blocks[:, 48:52], 4).reshape(-1, 16)
    w = np.concatenate([part1, part2, part3], axis=1).reshape(m, k)
    d = blocks[:, 52:54].copy().view("<f2").astype(np.float32).reshape(m, k // 256)
    return w, d
