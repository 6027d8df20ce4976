"""Float matmuls with float16 weights (output heads, tied embeddings): y = W . f16(x), float32 accumulation.

The activation is rounded to float16 by the caller, as ggml does for f16 weights. The head of a 2B model is
0.66 GB read once per decode step, so the kernel must run at memory speed: where the host converts float16 in
hardware (x86 F16C, ARM), `kernels.simd.f16_to_f32` lets LLVM emit `vcvtph2ps` + FMA straight from the
mmapped weights; elsewhere rows are converted with integer bit operations first (`f16_matmul_bits`).
Both sum in float32 with reassociation allowed (8-wide partial sums), like ggml's own SIMD dot products.
"""
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL, JIT_REDUCE_PARALLEL
from .simd import HAVE_AVX2, HAVE_F16C
from .tasks import next_task, task_ranges, worker_count

ROWS_PER_TASK = 64
F16_ROWS_PER_TASK = 32  # f16_matmul: 32 rows of a 2560-wide head = 160 KiB, kept in L2 across token pairs
_TWO_POW_112 = np.float32(2.0 ** 112)


@njit(**JIT_REDUCE_PARALLEL)
def f16_matmul_bits(w_bits, x, out, n_threads=0):
    """w_bits: u16[M, K] (float16 bits); x: f32[T, K] (f16-representable values) -> out: f32[T, M].
    n_threads: f16_matmul's signature (unused)."""
    M, K = w_bits.shape
    T = x.shape[0]
    n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        row_f = np.empty(K, dtype=np.float32)
        row_u = row_f.view(np.uint32)
        m_end = min(M, (task + 1) * ROWS_PER_TASK)
        for m in range(task * ROWS_PER_TASK, m_end):
            for k in range(K):
                h = np.uint32(w_bits[m, k])
                row_u[k] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
            for k in range(K):
                row_f[k] *= _TWO_POW_112  # exact: re-biases the exponent (normal and subnormal halves)
            for t in range(T):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += row_f[k] * x[t, k]
                out[t, m] = acc


if HAVE_F16C:
    from .simd import f16_to_f32
    from .simd_dense import f16_dot1, f16_dot2

    @njit(**JIT)
    def _f16_tail(w_bits, m, x, t, k0):
        """sum over k >= k0 of w[m, k] * x[t, k] (the K % 32 values after the SIMD lines), in k order: not
        reassociated, so that no host's vector width changes it."""
        acc = np.float32(0.0)
        for k in range(k0, x.shape[1]):
            acc += f16_to_f32(w_bits[m, k]) * x[t, k]
        return acc

    @njit(**JIT)
    def f16_row_dot(w_bits, m, x, t):
        """f16_matmul's logit of row m for token t where it takes one token at a time (T odd: its last token), which
        is every token's value: a token's result does not depend on T (kernels.head_select computes rows alone)."""
        K = w_bits.shape[1]
        n_lines = K // 32
        d0 = f16_dot1(w_bits.reshape(-1), m * K, x.reshape(-1), t * K, K, n_lines) if n_lines else np.float32(0.0)
        if n_lines * 32 < K:
            d0 += _f16_tail(w_bits, m, x, t, n_lines * 32)
        return d0

    @njit(**JIT_PARALLEL)
    def f16_matmul(w_bits, x, out, n_threads=0):
        """w_bits: u16[M, K] (float16 bits, C order); x: f32[T, K] (f16-representable values, C order)
        -> out: f32[T, M]. Hardware float16 conversion straight from the weights (no row buffer), each weight
        line converted once per two tokens; a token's result does not depend on T. Tasks handed out as in the
        base-3 matmuls (kernels.tasks.next_task; n_threads: numba's thread count, 0 where not known): all-logits
        2B-4T decode 1.032x against the static split (8 of 8 rounds, `scripts/bench_ab.py ... --against 7347dfb`)."""
        M, K = w_bits.shape
        T = x.shape[0]
        n_lines = K // 32
        wf = w_bits.reshape(-1)
        xf = x.reshape(-1)
        n_tasks = (M + F16_ROWS_PER_TASK - 1) // F16_ROWS_PER_TASK
        workers = worker_count(n_tasks, n_threads)
        ranges = task_ranges(n_tasks, workers)
        for worker in prange(workers):
            task = next_task(ranges, worker)
            while task >= 0:
                m_lo = task * F16_ROWS_PER_TASK
                m_hi = min(M, m_lo + F16_ROWS_PER_TASK)
                # token pairs outside, rows inside: a pair's activations stay in L1 while the task's rows (read
                # from memory for the first pair) come from L2 for the next ones
                t = 0
                while t + 2 <= T:
                    for m in range(m_lo, m_hi):
                        d0 = d1 = np.float32(0.0)
                        if n_lines:
                            d0, d1 = f16_dot2(wf, m * K, xf, t * K, K, n_lines)
                        if n_lines * 32 < K:
                            d0 += _f16_tail(w_bits, m, x, t, n_lines * 32)
                            d1 += _f16_tail(w_bits, m, x, t + 1, n_lines * 32)
                        out[t, m] = d0
                        out[t + 1, m] = d1
                    t += 2
                if t < T:
                    for m in range(m_lo, m_hi):
                        out[t, m] = f16_row_dot(w_bits, m, x, t)
                task = next_task(ranges, worker)
else:
    f16_matmul = f16_matmul_bits


# --- int8 copies of the head: the optional approximate head (`head_type="int8"`) and the screened head ---

BOUND_SAFETY = 1.0 + 2.0 ** -20  # rounds the float64 error terms up past their own rounding and the f32 store


@njit(**JIT_REDUCE_PARALLEL)
def quantize_f16_rows_i8(w_bits, q, row_scales, e_norm, w_term, q_norm):
    """w_bits: u16[M, K] float16 bits -> q: i8[M, K], row_scales: f32[M]: w ~= q * scale with
    scale = max|w_row| / 127 (1 for an all-zero row), q = round_half_even(w / scale); and the screened head's
    error terms (kernels.head_screen), f32[M] each, rounded up: e_norm >= ||w - scale*q||_2 (inf for a row
    holding an inf or NaN), w_term >= (K + 8) * 2^-24 * ||w||_2 (the f32 sum of the exact f16 dot),
    q_norm >= scale * ||q||_2."""
    M, K = w_bits.shape
    n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        row_f = np.empty(K, dtype=np.float32)
        row_u = row_f.view(np.uint32)
        for m in range(task * ROWS_PER_TASK, min(M, (task + 1) * ROWS_PER_TASK)):
            finite = True
            for k in range(K):
                h = np.uint32(w_bits[m, k])
                finite &= (h & np.uint32(0x7C00)) != np.uint32(0x7C00)
                row_u[k] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
            amax = np.float32(0.0)
            for k in range(K):
                row_f[k] *= _TWO_POW_112
                amax = max(amax, abs(row_f[k]))
            scale = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
            row_scales[m] = scale
            e2 = w2 = q2 = 0.0  # float64 sums
            for k in range(K):
                qk = np.rint(row_f[k] / scale)
                q[m, k] = np.int8(qk)
                wk = np.float64(row_f[k])
                e = wk - np.float64(scale) * np.float64(qk)  # exact: a 24-bit scale times an 8-bit integer
                e2 += e * e
                w2 += wk * wk
                q2 += np.float64(qk) * np.float64(qk)
            e_norm[m] = np.float32(np.sqrt(e2) * BOUND_SAFETY) if finite else np.float32(np.inf)
            w_term[m] = np.float32((K + 8) * 2.0 ** -24 * np.sqrt(w2) * BOUND_SAFETY)
            q_norm[m] = np.float32(np.float64(scale) * np.sqrt(q2) * BOUND_SAFETY)


@njit(**JIT)
def _i8_dot_plain(wq, m, xq, t):
    acc = 0
    for k in range(wq.shape[1]):
        acc += np.int32(wq[m, k]) * np.int32(xq[t, k])
    return acc


if HAVE_AVX2:
    from .simd_dense import i8_dot_abs1, i8_dot_abs2

    @njit(**JIT_PARALLEL)
    def i8_matmul(wq, row_scales, xq, x_scales, out):
        """wq: i8[M, K] (C order); row_scales: f32[M]; xq: i8[T, K] with x ~= xq / x_scales (per-token absmax,
        as the ternary path) -> out: f32[T, M] = float32(exact int dot) * row_scale / x_scale.
        SIMD: sign-transfer + u8 x i8 multiply-add, weights prefetched."""
        M, K = wq.shape
        T = xq.shape[0]
        n = K // 32
        xa = np.empty((T, K), np.uint8)  # |x| (128 for -128)
        for t in range(T):
            for k in range(K):
                xa[t, k] = np.uint8(abs(np.int32(xq[t, k])))
        wf, xf, xaf = wq.reshape(-1), xq.reshape(-1), xa.reshape(-1)
        n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for task in prange(n_tasks):
            m_lo = task * ROWS_PER_TASK
            m_hi = min(M, m_lo + ROWS_PER_TASK)
            # token pairs outside, rows inside: a pair's activations stay in L1, the task's rows in L2
            t = 0
            while t < T:
                two = t + 2 <= T
                for m in range(m_lo, m_hi):
                    a0 = a1 = 0
                    if n and two:
                        a0, a1 = i8_dot_abs2(wf, m * K, xf, xaf, t * K, K, n)
                    elif n:
                        a0 = i8_dot_abs1(wf, m * K, xf, xaf, t * K, K, n)
                    for k in range(n * 32, K):
                        a0 += np.int32(wq[m, k]) * np.int32(xq[t, k])
                        if two:
                            a1 += np.int32(wq[m, k]) * np.int32(xq[t + 1, k])
                    out[t, m] = np.float32(a0) * row_scales[m] / x_scales[t]
                    if two:
                        out[t + 1, m] = np.float32(a1) * row_scales[m] / x_scales[t + 1]
                t += 2
else:
    @njit(**JIT_PARALLEL)
    def i8_matmul(wq, row_scales, xq, x_scales, out):
        """wq: i8[M, K] (C order); row_scales: f32[M]; xq: i8[T, K] with x ~= xq / x_scales (per-token absmax,
        as the ternary path) -> out: f32[T, M] = float32(exact int dot) * row_scale / x_scale."""
        M = wq.shape[0]
        T = xq.shape[0]
        n_tasks = (M + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for task in prange(n_tasks):
            for m in range(task * ROWS_PER_TASK, min(M, (task + 1) * ROWS_PER_TASK)):
                for t in range(T):
                    out[t, m] = np.float32(_i8_dot_plain(wq, m, xq, t)) * row_scales[m] / x_scales[t]
