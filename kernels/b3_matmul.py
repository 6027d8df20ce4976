"""Ternary x int8 matmuls over B3 weights (kernels.b3_simd's base-3 layout, 1.6 bits per weight): the contract
and the results (same bits) of kernels.ternary_matmul's I2_S matmuls, for hosts with `HAVE_B3`.

out[t, m] = float32(sum_k code[m, k] q[t, k] - act_sums[t]) / act_scales[t] * scale. Tasks are row tiles of 16
rows (pairs of them for AMX), each thread taking its static run of them and then the back halves of slower
threads' runs (kernels.tasks.next_task: greedy 2B-4T decode 1.036-1.041x, 6 and 8 of 8 rounds in one process
against the static split, `scripts/bench_ab.py -m out/2b4t-i2s.gguf --against ddc383b -t 2 --rounds 8 -n 32
-p 16 --top-k 1 --same-top-k`, with GOMP_SPINCOUNT 10000 and 1000000; prefill the same); inside a task, tokens go 4, 2, then 1 at a time through `b3_dots*`, each row tile
read once per group while it stays in cache. Steps of AMX_MIN_TOKENS tokens or more run on AMX tiles where the
host has them (`b3_rows_amx`: each row tile decoded into its code tiles, kernels.amx's 2 x 2 tile products).

Decode on a 2-vCPU Intel Xeon, 2 threads, the 2B-4T layer shapes over 30 layers from memory (one process,
medians of 6 alternated rounds): 22.9 against 26.6 ms per token for the I2_S VNNI loop (1.16x; the bytes alone
would give 1.25x).
"""
import numpy as np
from numba import njit, prange

from .amx import HAVE_AMX, TILE_K, prefetch_lines, tile_config, tile_config_bytes, tile_products, tile_release
from .b3_simd import SB_BYTES, SB_K, TILE_ROWS, b3_dots1, b3_dots2, b3_dots4, b3_unpack_lines, padded_k
from .config import JIT, JIT_PARALLEL
from .tasks import n_tasks3, next_task, task3, task_ranges, worker_count
from .ternary_matmul import AMX_MIN_TOKENS


@njit(**JIT)
def padded_activations(q, rows):
    """q: i8[T, K] -> i8[rows, Kp] (rows >= T): zero past T and past K (Kp: K in whole super-blocks)."""
    T, K = q.shape
    kp = padded_k(K)
    if kp == K and rows == T:
        return q
    out = np.zeros((rows, kp), np.int8)
    out[:T, :K] = q
    return out


@njit(**JIT)
def _store(sums, n_tok, t, m0, act_scales, act_sums, scale, out):
    """sums: i32[16 n_tok] of tokens t.. and rows m0.. -> out."""
    for i in range(n_tok):
        for n in range(TILE_ROWS):
            out[t + i, m0 + n] = np.float32(sums[16 * i + n] - act_sums[t + i]) / act_scales[t + i] * scale


@njit(**JIT)
def _rows_b3(packed, qp, T, act_scales, act_sums, scale, out, r_lo, r_hi, sums):
    """Row tiles [r_lo, r_hi) of out[:T] from qp = padded_activations(q, T); sums: i32[>= 4 * TILE_ROWS] scratch."""
    kp = qp.shape[1]
    n_lines = kp // SB_K * 16
    tile_bytes = kp // SB_K * SB_BYTES
    qf = qp.reshape(-1)
    for r in range(r_lo, r_hi):
        w0 = r * tile_bytes
        t = 0
        while t + 4 <= T:
            b3_dots4(packed, w0, qf, t * kp, kp, n_lines, sums, 0)
            _store(sums, 4, t, r * TILE_ROWS, act_scales, act_sums, scale, out)
            t += 4
        if t + 2 <= T:
            b3_dots2(packed, w0, qf, t * kp, kp, n_lines, sums, 0)
            _store(sums, 2, t, r * TILE_ROWS, act_scales, act_sums, scale, out)
            t += 2
        if t < T:
            b3_dots1(packed, w0, qf, t * kp, kp, n_lines, sums, 0)
            _store(sums, 1, t, r * TILE_ROWS, act_scales, act_sums, scale, out)


@njit(**JIT)
def _line_aligned(n):
    """u8[n] starting at a 64-byte boundary: the decoded lines are written whole (NumPy's 16-byte alignment split
    each store over two cache lines; a 2560 x 6912 unpack took 0.93 against 0.40 ms on one thread)."""
    buf = np.empty(n + 64, np.uint8)
    off = (64 - buf.ctypes.data % 64) % 64
    return buf[off:off + n]


if HAVE_AMX:
    @njit(**JIT)
    def _unpack_tile(packed, r, n_sb, codes, end):
        """Row tile r -> codes: u8[Kp / 64 * 1024] (AMX B tiles in K order), prefetching the next row tile."""
        tile_bytes = n_sb * SB_BYTES
        for s in range(n_sb):
            nxt = (r + 1) * tile_bytes + s * SB_BYTES
            prefetch_lines(packed, nxt, max(0, min(SB_BYTES, end - nxt)) // 64)
            b3_unpack_lines(packed, r * tile_bytes + s * SB_BYTES, 16, codes, s * 5 * SB_BYTES)

    @njit(**JIT)
    def b3_rows_amx(packed, qp, T, act_scales, act_sums, scale, out, r_lo, r_hi, cfg, sums, codes):
        """Row tiles [r_lo, r_hi) of out[:T] on AMX tiles, from qp = padded_activations(q, whole 16-token tiles):
        pairs of row tiles against pairs of token tiles (kernels.amx.tile_products). sums, codes: `_scratch`."""
        kp = qp.shape[1]
        n_sb = kp // SB_K
        n_codes = kp // TILE_K * SB_BYTES
        codes = codes.reshape(2, n_codes)
        sums = sums.reshape(4, TILE_ROWS, TILE_ROWS)
        end = packed.shape[0]
        tile_config(cfg)
        for r in range(r_lo, r_hi, 2):
            pair = r + 2 <= r_hi
            _unpack_tile(packed, r, n_sb, codes[0], end)
            if pair:
                _unpack_tile(packed, r + 1, n_sb, codes[1], end)
            tile_products(qp.reshape(-1), kp, qp.shape[0], T, codes[0], codes[1], pair, r * TILE_ROWS, sums,
                          act_scales, act_sums, scale, out)
        tile_release()

    @njit(**JIT)
    def _rows_any(packed, qp, T, act_scales, act_sums, scale, out, r_lo, r_hi, cfg, sums, codes):
        if T >= AMX_MIN_TOKENS:
            b3_rows_amx(packed, qp, T, act_scales, act_sums, scale, out, r_lo, r_hi, cfg, sums, codes)
        else:
            _rows_b3(packed, qp, T, act_scales, act_sums, scale, out, r_lo, r_hi, sums)
else:
    @njit(**JIT)
    def _rows_any(packed, qp, T, act_scales, act_sums, scale, out, r_lo, r_hi, cfg, sums, codes):
        _rows_b3(packed, qp, T, act_scales, act_sums, scale, out, r_lo, r_hi, sums)


@njit(**JIT)
def _scratch(qp, per):
    """A worker's buffers for all its tasks -> (sums: i32[4 * 16 * 16], codes: u8[2 row tiles' AMX code tiles] where
    tasks are AMX pairs (per == 2), else u8[0]), 64-byte aligned: allocated once per worker, not once per 16-row
    task (~8 KB streamed in ~0.8 us). A synthetic probe of the 210 matmuls of a 2B-4T token measured 1.06x; in
    the model, greedy decode 1.001x (4 of 8 rounds, `scripts/bench_ab.py ... --against a82afea`): kept because
    kernels.layer_region reuses the rows kernels with a worker's buffers."""
    n_codes = qp.shape[1] // TILE_K * SB_BYTES if per == 2 else 0
    return _line_aligned(4 * TILE_ROWS * TILE_ROWS * 4).view(np.int32), _line_aligned(2 * n_codes)


@njit(**JIT)
def _inputs(q):
    """-> (activations padded for the step, row tiles per task, tile configuration)."""
    T = q.shape[0]
    amx = HAVE_AMX and T >= AMX_MIN_TOKENS
    rows = (T + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS if amx else T
    return padded_activations(q, rows), 2 if amx else 1, tile_config_bytes()


@njit(**JIT_PARALLEL)
def b3_matmul_multi(p0, p1, p2, q, act_scales, act_sums, s0, s1, s2, o0, o1, o2, n_threads):
    """Up to three B3 weights on the same activations in one parallel region (p2/o2 may be empty: u8[0],
    f32[T, 0]), as kernels.ternary_matmul.i2s_matmul_multi."""
    T = q.shape[0]
    qp, per, cfg = _inputs(q)
    n0, n1, n2 = o0.shape[1] // TILE_ROWS, o1.shape[1] // TILE_ROWS, o2.shape[1] // TILE_ROWS
    n_tasks = n_tasks3(per, n0, n1, n2)
    workers = worker_count(n_tasks, n_threads)
    ranges = task_ranges(n_tasks, workers)
    for t in prange(workers):
        sums, codes = _scratch(qp, per)
        task = next_task(ranges, t)
        while task >= 0:
            w, lo, hi = task3(task, per, n0, n1, n2)
            if w == 0:
                _rows_any(p0, qp, T, act_scales, act_sums, s0, o0, lo, hi, cfg, sums, codes)
            elif w == 1:
                _rows_any(p1, qp, T, act_scales, act_sums, s1, o1, lo, hi, cfg, sums, codes)
            else:
                _rows_any(p2, qp, T, act_scales, act_sums, s2, o2, lo, hi, cfg, sums, codes)
            task = next_task(ranges, t)


@njit(**JIT)
def b3_matmul(packed, q, act_scales, act_sums, scale, out, n_threads):
    """packed: u8[M Kp / 5] B3 (M % 16 == 0); q: i8[T, K] (C order); act_scales: f32[T]; act_sums: i32[T];
    scale: f32 -> out: f32[T, M]. n_threads: numba's thread count (the task ranges). b3_matmul_multi with one
    weight (the other two of zero rows: the same tasks, in the same order)."""
    none = np.empty((out.shape[0], 0), np.float32)
    b3_matmul_multi(packed, packed, packed, q, act_scales, act_sums, scale, scale, scale, out, none, none, n_threads)
