"""The screened head: the exact logits a sampler reads, from half the bytes of a float16 output head.

A 2B-4T decode step reads 0.52 GB of ternary weights and 0.66 GB of f16 head. Greedy decoding reads one logit
of the head's 128256, top-k sampling (the server's default, k = 40) k of them plus the few that penalties and
logit_bias touch. The screened head keeps an int8 copy of the head with per-row error terms
(`kernels.dense.quantize_f16_rows_i8`), bounds every logit from it (`kernels.head_screen`: 0.33 GB read), and
computes exact f16 logits only for the rows whose bound interval reaches the k-th best lower bound (tens to
hundreds of rows; chosen, read and computed by `kernels.head_select`). Every other row is provably below the top
k, and those rows come back as -inf. The sampler then picks exactly the token it would have picked from the full
row; `TopRequest` says per row what it reads.
Requests that need the whole distribution (logprobs, top_k disabled) get the full f16 head.

The int8 copy is built at the first load (0.3-1.5 s at 2B-4T on 2 vCPUs) and kept in the repack cache
(`bitnet_py.repack_cache`), so later loads map it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from kernels import head_select
from kernels.dense import f16_matmul, quantize_f16_rows_i8
from kernels.head_screen import (ROW_E_NORM, ROW_Q_NORM, ROW_SCALE, ROW_W_TERM, activation_max,
                                 quantize_activation_i16, screen_bounds)
from kernels.simd import HAVE_F16C

from .huge_pages import zeros
from .sampling import TopRequest

SCREEN_MAX_K = 256  # larger top_k values read the full head: the candidate rows would cost more than they save
MAX_EXACT_ROWS = 4096  # a row with more candidates is computed whole (a read per row: 1-40 us on a VM)
NO_IDS = np.zeros(0, np.int64)
CHUNK_ROWS = 8192  # rows of the f16 head quantized (then released from RSS) at a time
CACHE_SUFFIXES = ("#screen_q", "#screen_rows")  # repack cache entries: q, rows


@dataclass
class ScreenedHead:
    q: np.ndarray  # i8[M, K]: int8 codes of the f16 head
    rows: np.ndarray  # f32[4, M]: per row the scale (w ~= q * scale) and the error terms (kernels.head_screen ROW_*)

    @property
    def row_scales(self) -> np.ndarray:
        return self.rows[ROW_SCALE]


def quantize_head(w_bits: np.ndarray, release_rows=None) -> ScreenedHead:
    """u16[M, K] float16 bits -> ScreenedHead in anonymous memory (huge pages where offered), in row chunks;
    `release_rows(lo, hi)` is called after each chunk (to release its f16 pages from the resident set)."""
    M, K = w_bits.shape
    q = zeros((M, K), np.int8)
    rows = np.empty((4, M), np.float32)
    for lo in range(0, M, CHUNK_ROWS):
        hi = min(M, lo + CHUNK_ROWS)
        quantize_f16_rows_i8(w_bits[lo:hi], q[lo:hi], rows[ROW_SCALE, lo:hi], rows[ROW_E_NORM, lo:hi],
                             rows[ROW_W_TERM, lo:hi], rows[ROW_Q_NORM, lo:hi])
        if release_rows is not None:
            release_rows(lo, hi)
    return ScreenedHead(q, rows)


def cached_head(get, put, name: str, w_bits: np.ndarray, release_rows=None) -> ScreenedHead:
    """The head's int8 copy from a cache (`get(key, nbytes)` -> u8 array or None), or built and `put(key, u8)`."""
    M, K = w_bits.shape
    q_bytes, rows_bytes = get(name + CACHE_SUFFIXES[0], M * K), get(name + CACHE_SUFFIXES[1], 16 * M)
    if q_bytes is not None and rows_bytes is not None:
        return ScreenedHead(q_bytes.view(np.int8).reshape(M, K), rows_bytes.view(np.float32).reshape(4, M))
    head = quantize_head(w_bits, release_rows)
    put(name + CACHE_SUFFIXES[0], head.q.reshape(-1).view(np.uint8))
    put(name + CACHE_SUFFIXES[1], head.rows.reshape(-1).view(np.uint8))
    return head


def screening_possible() -> bool:
    """The exact rows are recomputed with f16_matmul's hardware-conversion kernel, whose per-row results do not
    depend on which rows share a call; the bit-conversion fallback gives no such guarantee."""
    return HAVE_F16C


def can_screen(request: TopRequest | None, n_rows: int) -> bool:
    """Whether a row's request leaves the screen something to cut (k up to SCREEN_MAX_K, rows beyond k + keep)."""
    return request is not None and 1 <= request.k <= min(SCREEN_MAX_K, n_rows - request.keep.size - 1)


def screened_logits(w_bits: np.ndarray, head: ScreenedHead, y: np.ndarray,
                    requests: list[TopRequest | None], row_file: tuple[int, int] | None = None) -> np.ndarray:
    """w_bits: u16[M, K] the f16 head; y: f32[R, K] the activations exactly as the f16 kernel takes them
    (rounded to f16 where ggml rounds); requests[r] None for a full row -> logits f32[R, M], exact where a
    sampler reads them, -inf at the rows the screen proves below the top k. row_file: (file descriptor, byte
    offset of the head) to read the exact rows from (the model's: they stay out of the resident set), or None
    to read them from w_bits."""
    R, K = y.shape
    M = w_bits.shape[0]
    out = np.empty((R, M), np.float32)
    amax = np.abs(y).max(axis=1, initial=0.0)  # NaN where a row holds one, inf where it holds an inf
    finite = np.isfinite(amax) & (amax > 0)
    screened = [r for r in range(R) if finite[r] and can_screen(requests[r], M)]
    full = [r for r in range(R) if r not in screened]
    if screened:
        ys = np.ascontiguousarray(y[screened])
        S = len(screened)
        p, act = np.empty((S, K), np.int16), np.empty((S, 5))
        quantize_activation_i16(ys, activation_max(K), p, act)
        lower, upper = np.empty((S, M), np.float32), np.empty((S, M), np.float32)
        screen_bounds(head.q, head.rows, p, act, lower, upper)
        fd, offset = row_file if row_file is not None else (-1, 0)
        ids = np.empty(M, np.int64)
        for j, r in enumerate(screened):
            keep = requests[r].keep
            keep = np.unique(np.asarray(keep, dtype=np.int64)) if keep.size else NO_IDS
            if keep.size and (keep[0] < 0 or keep[-1] >= M):
                raise IndexError(f"kept logit ids outside [0, {M})")
            n = head_select.select_rows(lower[j], upper[j], requests[r].k, keep, ids)
            if n > MAX_EXACT_ROWS:  # a flat row: the whole head costs less than this many reads
                full.append(r)
                continue
            bad = head_select.exact_rows(w_bits, fd, offset, ids[:n], ys, j, np.empty((n, K), np.uint16), out[r])
            if bad >= 0:
                raise OSError(f"short read of the head's row {bad} (file truncated or closed?)")
    if full:
        vals = np.empty((len(full), M), np.float32)
        f16_matmul(w_bits, np.ascontiguousarray(y[full]), vals, numba.get_num_threads())
        out[full] = vals
    return out
