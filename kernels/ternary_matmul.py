"""Ternary x int8 matmul over I2_S-packed weights (the layout of bitnet.cpp's I2_S tensors).

Weights: uint8[M * K / 4]; row m is bytes [m*K/4, (m+1)*K/4); in each 32-byte block byte p holds the 2-bit
codes of values p, p+32, p+64, p+96 of that 128-value block at shifts 6, 4, 2, 0; weight = code - 1.
Exact integer accumulation: dot = sum(code * q) - sum(q); then y = float32(dot) / s_a * scale (float32).

Three implementations with identical results:
- AMX tiles (`kernels.amx`, hosts with AMX-INT8 such as Sapphire Rapids) for steps of AMX_MIN_TOKENS tokens or
  more (prefill, large batches): 16 tokens x 64 K x 16 rows per `tdpbsud`, the rows of a task past its last whole
  group of 16 by the SIMD loop below. On a 2-vCPU Intel Xeon (one process against the VNNI loop, 2 threads):
  pp128 1.90x with one sums tile, then 1.228x more with kernels.amx's 2 x 2 blocks; batched decode of 16 / 20 /
  32 sequences 1.045 / 1.134 / 1.30x (one sums tile);
- SIMD (hosts with AVX2, `kernels.simd`; `kernels.simd_vnni` where the host has VNNI): `vpmaddubsw` (or
  `vpdpbusd`) on unpacked codes, 128 codes per step, up to 4 tokens
  per weight unpack. Rows are split into tasks of up to `ROWS_PER_TASK` (fewer on many-core hosts,
  `kernels.tasks.balanced_rows_per_task`); inside a task, tokens go in tiles of 4 so
  one tile of activations stays in L1 while the task's rows stream past it.
- plain loops (any host): the reference-shaped loop Numba compiles everywhere.

Every kernel takes a last argument `n_threads` (numba's thread count; 0: tasks of ROWS_PER_TASK rows)
that sizes the row tasks for the host (`kernels.tasks.balanced_rows_per_task`).

`i2s_matmul_multi` runs up to three weights that read the same activations (q/k/v, gate/up) in one parallel
region: one quantization, one fork/join instead of three.

Hosts with AVX-512 VBMI + VNNI keep per-tensor-scaled weights in the base-3 layout instead (kernels.b3_simd,
kernels.b3_matmul: the same contract and bits from 0.8x the bytes); these kernels serve the other hosts, the
block-scaled and forced kernel choices, and tensors that hold a code 3. Row tasks are handed out as in the base-3
matmuls (kernels.tasks.next_task): with `BITNET_PY_B3=0` on the Intel VM, greedy 2B-4T decode 1.054x against the
static split (8 of 8 rounds, `scripts/bench_ab.py ... --against ebcc7a4`).
"""
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL
from .tasks import balanced_rows_per_task, n_tasks3, next_task, task3, task_ranges, worker_count
from .simd import HAVE_AVX2, HAVE_VNNI
from .amx import HAVE_AMX, i2s_rows_amx, permute_activations, tile_config_bytes

ROWS_PER_TASK = 32
AMX_MIN_TOKENS = 16  # AMX tiles (kernels.amx) from this many tokens: one tile of activations is 16 tokens
# (16 sequences decoded together: 1.045x the VNNI loop once the unpacking prefetched the next rows, 0.937 before)


@njit(**JIT)
def _rows_plain(packed, q, act_scales, act_sums, scale, out, m_lo, m_hi):
    """Rows [m_lo, m_hi) of out for all tokens, plain loops."""
    T, K = q.shape
    row_bytes = K // 4
    n_blocks = K // 128
    for m in range(m_lo, m_hi):
        base = m * row_bytes
        for t in range(T):
            acc = 0
            for b in range(n_blocks):
                o = base + b * 32
                k0 = b * 128
                blk = 0
                for p in range(32):
                    byte = np.int32(packed[o + p])
                    blk += (((byte >> 6) & 3) * np.int32(q[t, k0 + p])
                            + ((byte >> 4) & 3) * np.int32(q[t, k0 + 32 + p])
                            + ((byte >> 2) & 3) * np.int32(q[t, k0 + 64 + p])
                            + (byte & 3) * np.int32(q[t, k0 + 96 + p]))
                acc += blk
            out[t, m] = np.float32(acc - act_sums[t]) / act_scales[t] * scale


if HAVE_AVX2:
    if HAVE_VNNI:
        from .simd_vnni import i2s_dot1, i2s_dot2, i2s_dot4
    else:
        from .simd import i2s_dot1, i2s_dot2, i2s_dot4

    @njit(**JIT)
    def _rows(packed, q, act_scales, act_sums, scale, out, m_lo, m_hi):
        """Rows [m_lo, m_hi) of out for all tokens, SIMD dot products, 4 tokens per weight unpack."""
        T, K = q.shape
        row_bytes = K // 4
        n_blocks = K // 128
        qf = q.reshape(-1)  # i8[T*K]
        t = 0
        while t + 4 <= T:
            for m in range(m_lo, m_hi):
                d0, d1, d2, d3 = i2s_dot4(packed, m * row_bytes, qf, t * K, K, n_blocks)
                out[t, m] = np.float32(d0 - act_sums[t]) / act_scales[t] * scale
                out[t + 1, m] = np.float32(d1 - act_sums[t + 1]) / act_scales[t + 1] * scale
                out[t + 2, m] = np.float32(d2 - act_sums[t + 2]) / act_scales[t + 2] * scale
                out[t + 3, m] = np.float32(d3 - act_sums[t + 3]) / act_scales[t + 3] * scale
            t += 4
        if t + 2 <= T:
            for m in range(m_lo, m_hi):
                d0, d1 = i2s_dot2(packed, m * row_bytes, qf, t * K, K, n_blocks)
                out[t, m] = np.float32(d0 - act_sums[t]) / act_scales[t] * scale
                out[t + 1, m] = np.float32(d1 - act_sums[t + 1]) / act_scales[t + 1] * scale
            t += 2
        if t < T:
            for m in range(m_lo, m_hi):
                d0 = i2s_dot1(packed, m * row_bytes, qf, t * K, K, n_blocks)
                out[t, m] = np.float32(d0 - act_sums[t]) / act_scales[t] * scale
else:
    _rows = _rows_plain


if HAVE_AMX:
    @njit(**JIT)
    def _rows_any(packed, q, qp, act_scales, act_sums, scale, out, m_lo, m_hi, cfg):
        """Rows [m_lo, m_hi): AMX tiles for the whole groups of 16 rows where qp (permuted activations) is
        given (T >= AMX_MIN_TOKENS), the SIMD rows for the rest (the same integers)."""
        n16 = (m_hi - m_lo) // 16 * 16 if qp.shape[0] else 0
        if n16:
            i2s_rows_amx(packed, qp, q.shape[0], act_scales, act_sums, scale, out, m_lo, m_lo + n16, cfg)
        if m_lo + n16 < m_hi:
            _rows(packed, q, act_scales, act_sums, scale, out, m_lo + n16, m_hi)

    @njit(**JIT)
    def _amx_inputs(q):
        """-> (permuted activations, or i8[0, K] below AMX_MIN_TOKENS tokens; the tile configuration)."""
        if q.shape[0] >= AMX_MIN_TOKENS and q.shape[1] % 128 == 0:
            return permute_activations(q), tile_config_bytes()
        return np.zeros((0, q.shape[1]), np.int8), tile_config_bytes()
else:
    @njit(**JIT)
    def _rows_any(packed, q, qp, act_scales, act_sums, scale, out, m_lo, m_hi, cfg):
        _rows(packed, q, act_scales, act_sums, scale, out, m_lo, m_hi)

    @njit(**JIT)
    def _amx_inputs(q):
        return np.zeros((0, q.shape[1]), np.int8), np.zeros(64, np.uint8)


@njit(**JIT_PARALLEL)
def i2s_matmul(packed, q, act_scales, act_sums, scale, out, n_threads):
    """packed: u8[M*K/4]; q: i8[T, K] (C order); act_scales: f32[T]; act_sums: i32[T]; scale: f32
    -> out: f32[T, M]. AMX tiles for 16+ tokens where the host has them, SIMD when it has AVX2, else plain
    loops."""
    M = out.shape[1]
    r = balanced_rows_per_task(ROWS_PER_TASK, M, 0, 0, n_threads)
    qp, cfg = _amx_inputs(q)
    n_tasks = n_tasks3(r, M, 0, 0)
    workers = worker_count(n_tasks, n_threads)
    ranges = task_ranges(n_tasks, workers)
    for worker in prange(workers):
        task = next_task(ranges, worker)
        while task >= 0:
            _rows_any(packed, q, qp, act_scales, act_sums, scale, out, task * r, min(M, task * r + r), cfg)
            task = next_task(ranges, worker)


@njit(**JIT_PARALLEL)
def i2s_matmul_multi(p0, p1, p2, q, act_scales, act_sums, s0, s1, s2, o0, o1, o2, n_threads):
    """Up to three weights on the same activations in one parallel region: o_i = W_i q (p2/o2 may be
    empty: u8[0], f32[T, 0]). AMX, SIMD or plain loops as i2s_matmul."""
    M0, M1, M2 = o0.shape[1], o1.shape[1], o2.shape[1]
    r = balanced_rows_per_task(ROWS_PER_TASK, M0, M1, M2, n_threads)
    qp, cfg = _amx_inputs(q)
    n_tasks = n_tasks3(r, M0, M1, M2)
    workers = worker_count(n_tasks, n_threads)
    ranges = task_ranges(n_tasks, workers)
    for worker in prange(workers):
        task = next_task(ranges, worker)
        while task >= 0:
            w, lo, hi = task3(task, r, M0, M1, M2)
            if w == 0:
                _rows_any(p0, q, qp, act_scales, act_sums, s0, o0, lo, hi, cfg)
            elif w == 1:
                _rows_any(p1, q, qp, act_scales, act_sums, s1, o1, lo, hi, cfg)
            else:
                _rows_any(p2, q, qp, act_scales, act_sums, s2, o2, lo, hi, cfg)
            task = next_task(ranges, worker)


@njit(**JIT_PARALLEL)
def i2s_matmul_plain(packed, q, act_scales, act_sums, scale, out, n_threads):
    """packed: u8[M*K/4]; q: i8[T, K] (C order); act_scales: f32[T]; act_sums: i32[T]; scale: f32
    -> out: f32[T, M]. Plain loops (any host; reference for tests)."""
    M = out.shape[1]
    r = balanced_rows_per_task(ROWS_PER_TASK, M, 0, 0, n_threads)
    for task in prange(n_tasks3(r, M, 0, 0)):
        _rows_plain(packed, q, act_scales, act_sums, scale, out, task * r, min(M, task * r + r))


@njit(**JIT_PARALLEL)
def i2s_matmul_multi_plain(p0, p1, p2, q, act_scales, act_sums, s0, s1, s2, o0, o1, o2, n_threads):
    """Up to three weights on the same activations in one parallel region: o_i = W_i q (p2/o2 may be
    empty: u8[0], f32[T, 0]). Plain loops (any host; reference for tests)."""
    M0, M1, M2 = o0.shape[1], o1.shape[1], o2.shape[1]
    r = balanced_rows_per_task(ROWS_PER_TASK, M0, M1, M2, n_threads)
    for task in prange(n_tasks3(r, M0, M1, M2)):
        w, lo, hi = task3(task, r, M0, M1, M2)
        if w == 0:
            _rows_plain(p0, q, act_scales, act_sums, s0, o0, lo, hi)
        elif w == 1:
            _rows_plain(p1, q, act_scales, act_sums, s1, o1, lo, hi)
        else:
            _rows_plain(p2, q, act_scales, act_sums, s2, o2, lo, hi)
