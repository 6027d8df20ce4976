"""Numpy encoders for the ternary weight types (the exact inverse of ternary_unpack) and the ternarization rules.

Packers take int8 ternary codes `w[M, K]` in {-1, 0, +1} and a scale and return the tensor's whole GGUF data
region as a uint8 array (layouts in ../shared/fixtures/README.md for I2_S/TL2, upstream ggml for TQ1_0/TQ2_0).
Everything is vectorized numpy: a 2560 x 6912 tensor packs in well under a second.

Ternarization rules:
- `ternarize_absmean`: BitNet b1.58's WeightQuant, `s = 1/max(mean|W|, 1e-5)`, `codes = clamp(round(W*s), -1, 1)`,
  dequantized value `codes / s`. bitnet.cpp's converter (and transformers) compute the mean with torch, whose float32
  sum has its own order; `torch_f32_sum` reproduces it (AVX2 8-lane cascade, ILP 4, 32768-element thread chunks), so
  the scale matches bitnet.cpp's files bit for bit. `threads` is the torch thread count of that run (2 for the
  fixtures); it only moves the last ulp of the mean.
- `quantize_i2s_rule`: llama-quantize's I2_S rule for a float tensor: `scale = max|W|`, code 0 where |W| < 1e-6,
  else the sign.
"""
from __future__ import annotations

import numpy as np

from .constants import I2S_BLOCK, I2S_TAIL_BYTES, TL2_ROWPERM, TL2_TAIL_BYTES
from .tl2_tiling import TL2Tile
from .ternary_unpack import tl2_region

TORCH_VEC_LANES = 8  # Vectorized<float>::size() with AVX2
TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE
DEFAULT_TORCH_THREADS = 2


# ---- ternarization ---------------------------------------------------------------------------------
def _seq_sum(x: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0 starting from 0 (x [n, ...] -> [...])."""
    acc = np.zeros(x.shape[1:], dtype=np.float32)
    for j in range(x.shape[0]):
        acc = acc + x[j]
    return acc


def _cascade(rows: np.ndarray, power: int) -> np.ndarray:
    """torch's 4-level cascade over rows [n, lanes]: level-0 sums of 2^power rows, pushed up a level every
    2^power sums; leftovers of each level are added at the end (level 0 first)."""
    step = 1 << power

    def level(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = b.shape[0] // step
        full = _seq_sum(b[:n * step].reshape(n, step, -1).transpose(1, 0, 2)) if n else b[:0]
        return full, _seq_sum(b[n * step:])

    b0, acc0 = level(rows)
    b1, acc1 = level(b0)
    b2, acc2 = level(b1)
    return ((acc0 + acc1) + acc2) + _seq_sum(b2)


def _torch_chunk_sum(x: np.ndarray, lanes: int) -> np.float32:
    n_vec = x.size // lanes
    n_ilp = n_vec // 4
    final = np.float32(0)
    if n_vec:
        power = max(4, (n_ilp - 1).bit_length() // 4 if n_ilp > 1 else 0)
        acc = _cascade(x[:n_ilp * 4 * lanes].reshape(n_ilp, 4 * lanes), power).reshape(4, lanes)
        p0 = acc[0]
        for e in range(n_ilp * 4, n_vec):
            p0 = p0 + x[e * lanes:(e + 1) * lanes]
        for c in range(1, 4):
            p0 = p0 + acc[c]
    for v in x[n_vec * lanes:]:
        final = np.float32(final + v)
    if n_vec:
        for v in p0:
            final = np.float32(final + v)
    return final


def torch_f32_sum(x: np.ndarray, threads: int = DEFAULT_TORCH_THREADS, lanes: int = TORCH_VEC_LANES) -> np.float32:
    """torch.sum of a contiguous float32 tensor on CPU, bit-exact (SumKernel cascade_sum order)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    if n < TORCH_GRAIN or threads <= 1:
        return _torch_chunk_sum(x, lanes)
    n_chunks = min(threads, -(-n // TORCH_GRAIN))
    size = -(-n // n_chunks)
    out = np.float32(0)
    for start in range(0, n, size):
        out = np.float32(out + _torch_chunk_sum(x[start:start + size], lanes))
    return out


def absmean_inverse_scale(w: np.ndarray, threads: int = DEFAULT_TORCH_THREADS) -> np.float32:
    """s = 1 / max(mean|W|, 1e-5) in float32, the mean computed as torch does (sum, then divide by numel)."""
    mean = np.float32(torch_f32_sum(np.abs(w), threads) / np.float32(w.size))
    return np.float32(1) / max(mean, np.float32(1e-5))


def absmean_dequant(w: np.ndarray, threads: int = DEFAULT_TORCH_THREADS) -> np.ndarray:
    """float32 `clamp(round(W*s), -1, 1) / s`, exactly what bitnet.cpp's converter writes to an f32 file
    (including -0.0 for negative weights that round to zero)."""
    w = np.asarray(w, dtype=np.float32)
    s = absmean_inverse_scale(w, threads)
    return (np.clip(np.round(w * s), -1, 1) / s).astype(np.float32)


def ternarize_absmean(w: np.ndarray, threads: int = DEFAULT_TORCH_THREADS) -> tuple[np.ndarray, np.float32]:
    """W (float32) -> (int8 codes, scale = 1/s): the dequantized weight is codes * scale."""
    w = np.asarray(w, dtype=np.float32)
    s = absmean_inverse_scale(w, threads)
    codes = np.clip(np.round(w * s), -1, 1).astype(np.int8)
    return codes, np.float32(np.float32(1) / s)


def quantize_i2s_rule(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """llama-quantize's I2_S rule on a float tensor: scale = max|W|; code 0 where |W| < 1e-6, else sign(W)."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.float32(np.abs(w).max()) if w.size else np.float32(0)
    codes = np.sign(w).astype(np.int8)  # NaN-free input assumed; sign(+-0) = 0
    codes[np.abs(w) <= np.float32(1e-6)] = 0  # f32(1e-6) < 1e-6 < next float: same as C's double compare
    return codes, scale


def _check_codes(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"ternary weight must be 2-D [M, K], got shape {w.shape}")
    return w.astype(np.int8, copy=False)


def _tail(scale, nbytes: int) -> np.ndarray:
    tail = np.zeros(nbytes, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype="<f4").view(np.uint8)
    return tail


# ---- I2_S ----------------------------------------------------------------------------------------------
def i2s_nbytes(m: int, k: int) -> int:
    return m * k // 4 + I2S_TAIL_BYTES


def pack_i2s_codes(w: np.ndarray) -> np.ndarray:
    """The M*K/4 packed bytes only: byte p of each 32-byte block holds values p, p+32, p+64, p+96 of its
    128-value block in bits 7-6, 5-4, 3-2, 1-0 as code w+1."""
    w = _check_codes(w)
    m, k = w.shape
    if k % I2S_BLOCK:
        raise ValueError(f"I2_S needs K % {I2S_BLOCK} == 0, got K={k}")
    c = (w.reshape(-1, 4, 32) + 1).astype(np.uint8)  # [blocks, group, p]
    return ((c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]).reshape(-1)  # u8[M*K/4]


def pack_i2s(w: np.ndarray, scale) -> np.ndarray:
    """int8 ternary [M, K] + scale -> I2_S data region uint8[M*K/4 + 32] (the 28 bytes after the scale zero)."""
    packed = pack_i2s_codes(w).reshape(-1)
    return np.concatenate([packed, _tail(scale, I2S_TAIL_BYTES)])


# ---- TL2 -----------------------------------------------------------------------------------------------
def tl2_nbytes(m: int, k: int) -> int:
    return tl2_region(m, k) + TL2_TAIL_BYTES


def pack_tl2(w: np.ndarray, scale, tile: TL2Tile) -> np.ndarray:
    """int8 ternary [M, K] + scale -> TL2 data region (inverse of unpack_tl2 with the same tiling)."""
    w = _check_codes(w)
    m, k = w.shape
    bm, bk = tile.bm, tile.bk
    if m % bm or bm % 32 or bk % 24:
        raise ValueError(f"TL2 tiling BM={bm}, BK={bk} does not fit weight {m}x{k}")
    three_k = (k // bk) * bk
    two_k = k - three_k
    if two_k % 32:
        raise ValueError(f"TL2 needs (K mod BK) % 32 == 0, got K={k}, BK={bk}")
    mb_n, g_n = m // bm, bm // 32
    rowperm = np.array(TL2_ROWPERM)
    r = np.arange(32)
    row_in_g = rowperm[r // 8] * 8 + r % 8
    rows = (np.arange(mb_n)[:, None, None] * bm + np.arange(g_n)[None, :, None] * 32
            + row_in_g[None, None, :]).reshape(-1)  # byte-order rows [mb*g*32]
    parts = []
    if three_k:
        kb_n = three_k // bk
        wp = w[rows, :three_k].astype(np.int16).reshape(mb_n, g_n, 32, kb_n, bk // 3, 3)
        v = 9 * wp[..., 0] + 3 * wp[..., 1] + wp[..., 2]  # [mb, g, r, kb, triple]
        nib = np.abs(v).astype(np.uint8).transpose(0, 3, 1, 4, 2)  # [mb, kb, g, triple, r]
        nib = nib.reshape(mb_n, kb_n, g_n, bk // 6, 2, 32)
        parts.append(((nib[:, :, :, :, 0] << 4) | nib[:, :, :, :, 1]).reshape(-1))
        wn = w[:, :three_k].astype(np.int16).reshape(mb_n, g_n, 32, kb_n, bk // 3, 3)
        vn = 9 * wn[..., 0] + 3 * wn[..., 1] + wn[..., 2]  # natural rows
        neg = (vn < 0).astype(np.uint16).transpose(0, 3, 1, 4, 2)  # [mb, kb, g, triple, nat]
        neg = neg.reshape(mb_n, kb_n, g_n, bk // 24, 8, 32).reshape(mb_n, kb_n, g_n, bk // 24, 8, 2, 16)
        shifts = (15 - (2 * np.arange(8)[:, None] + np.arange(2)[None, :])).astype(np.uint16)  # [i2, h]
        u16 = (neg << shifts[:, :, None]).sum(axis=(4, 5), dtype=np.uint16)  # [mb, kb, g, q, c]
        parts.append(u16.astype("<u2").reshape(-1).view(np.uint8))
    if two_k:
        kb2_n = two_k // 32
        wt = w[rows, three_k:].astype(np.int16).reshape(mb_n, g_n, 32, kb2_n, 16, 2)
        nib = (3 * wt[..., 0] + wt[..., 1] + 4).astype(np.uint8).transpose(0, 3, 1, 4, 2)  # [mb, kb2, g, pair, r]
        nib = nib.reshape(mb_n, kb2_n, g_n, 8, 2, 32)
        parts.append(((nib[:, :, :, :, 0] << 4) | nib[:, :, :, :, 1]).reshape(-1))
    body = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    region = tl2_region(m, k)
    if body.size > region:
        raise ValueError(f"TL2 packed size {body.size} exceeds the region {region} for {m}x{k}")
    out = np.zeros(region + TL2_TAIL_BYTES, dtype=np.uint8)
    out[:body.size] = body
    out[region:] = _tail(scale, TL2_TAIL_BYTES)
    return out


# ---- TQ2_0 / TQ1_0 (upstream ggml, 256-value blocks with an f16 scale) ----------------------------------
def _block_scales(scale, m: int, k: int) -> np.ndarray:
    if k % 256:
        raise ValueError(f"TQ types need K % 256 == 0, got K={k}")
    return np.broadcast_to(np.asarray(scale, dtype=np.float32), (m, k // 256)).astype("<f2").reshape(-1, 1)


def pack_tq2_0(w: np.ndarray, scale) -> np.ndarray:
    """int8 ternary [M, K] + scale (scalar or [M, K/256]) -> TQ2_0 blocks (qs[64], f16 d); value
    128*h + 32*l + j sits in qs[32*h + j] at bit shift 2*l."""
    w = _check_codes(w)
    m, k = w.shape
    d = _block_scales(scale, m, k)
    c = (w.reshape(-1, 2, 4, 32) + 1).astype(np.uint8)  # [blocks, h, l, j]
    qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)  # [blocks, 2, 32]
    return np.concatenate([qs.reshape(-1, 64), d.view(np.uint8)], axis=1).reshape(-1)


def _trits(c: np.ndarray, n: int, width: int) -> np.ndarray:
    """c [blocks, n*width] (digits 0..2, value index digit*width + byte) -> bytes ceil(q*256/243), q the
    base-3 number with digit 0 most significant, padded to 5 trits."""
    d = c.reshape(-1, n, width).astype(np.uint16)
    q = np.zeros(d[:, 0].shape, dtype=np.uint16)
    for i in range(n):
        q = q * 3 + d[:, i]
    q = q * (3 ** (5 - n))
    return ((q * 256 + 242) // 243).astype(np.uint8)


def pack_tq1_0(w: np.ndarray, scale) -> np.ndarray:
    """int8 ternary [M, K] + scale -> TQ1_0 blocks (qs[48], qh[4], f16 d), upstream base-3 packing."""
    w = _check_codes(w)
    m, k = w.shape
    d = _block_scales(scale, m, k)
    c = (w.reshape(-1, 256) + 1).astype(np.uint8)
    qs1 = _trits(c[:, :160], 5, 32)
    qs2 = _trits(c[:, 160:240], 5, 16)
    qh = _trits(c[:, 240:], 4, 4)
    return np.concatenate([qs1, qs2, qh, d.view(np.uint8)], axis=1).reshape(-1)
