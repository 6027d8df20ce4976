"""Faster drop-in for kernels.attention.paged_attention (same signature and arithmetic steps).

Differences: float16 K/V are widened with the hardware conversion (`kernels.simd.f16_to_f32`, exact, so
vectorizable) instead of table gathers, the q.k dot products sum in 8-lane partial sums (as ggml's own f16 dot
product does) in an order written out in `kernels.simd_attention` (`qk4x2`, `qk1x32`: the same bits on every host)
instead of one sequential float32 chain, and softmax exponentials come from `kernels.expf` (<= 1 ulp from exact,
vectorized; ggml's SIMD softmax also uses a polynomial) instead of libm. The double sum of the exponentials and the
optional float16 rounding of probabilities are unchanged, and so is the p.v order (a float32 product, then its
add, key by key) except for groups of 4 with a float16 cache: there each chunk of PV_CHUNK_KEYS keys is summed from
zero by one fused multiply-add per key, and the chunks' sums are added in key order. Work is split per (tile of
up to TOKENS_PER_TASK consecutive tokens of a sequence, KV head), so each float16 K/V row is widened once for all
query heads of its group (GQA) instead of once per head, and in a prefill each block of keys is read once for the
tile's tokens while it is in cache. Groups of 4 (2B-4T, Llama-3-8B) take the intrinsics of `kernels.simd_attention`
(q.k: eight sums per pair of keys, reduced together; p.v: 4 heads x 16 dims, or 32 in zmm registers on AVX-512
hosts, summed in registers across a block of keys) with the same p.v order. Only built where the host converts
float16 in hardware (`HAVE_F16C`); model.py falls back otherwise.
"""

import numpy as np
from numba import get_num_threads, njit, prange

from .config import JIT, JIT_PARALLEL
from .expf import expf_nonpositive
from .simd import HAVE_AVX512, HAVE_F16C

PV_KEY_BLOCK = 64  # keys per p.v block (their V rows stay in L1 for the block's 16-dim slices)
PV_CHUNK_KEYS = 256  # p.v sums keys in chunks of this many (from key 0), then the chunks in order (a multiple of
# PV_KEY_BLOCK): the split kernel's p.v tasks take whole V rows of a range of chunks (kernels.attention_split)
QK_KEY_BLOCK = 64  # keys per q.k block of a token tile (even: q.k pairs keys)
QK_PREFETCH_KEYS = 8  # q.k prefetches the K row of the key this far ahead (kernels.simd_attention.prefetch_row)
TOKENS_PER_TASK = 8  # consecutive tokens of a sequence per task at most (prefill), sharing each block of K/V
MIN_TASKS_PER_THREAD = 4  # ... fewer where tiles would leave fewer tasks than this per thread (many-core hosts)

if HAVE_F16C:
    from .simd import f16_to_f32, f32_to_f16_bits, i32_as_f32
    from .simd_attention import prefetch_row, pv4x16, pv4x32, qk1x32, qk4x2

    PV_DIMS = 32 if HAVE_AVX512 else 16  # dims per p.v call: zmm registers where the host has them
    pv4 = pv4x32 if HAVE_AVX512 else pv4x16

    @njit(**JIT)
    def _load_row(c16, c32, use_f32, slot, kvh, buf):
        """Cache row [kvh, slot, :] -> buf: f32[D], from the float32 cache or widened (exactly) from float16."""
        if use_f32:
            for d in range(buf.shape[0]):
                buf[d] = c32[kvh, slot, d]
        else:
            for d in range(buf.shape[0]):
                buf[d] = f16_to_f32(c16[kvh, slot, d])

    @njit(**JIT)
    def _dot(q, t, h, row):
        """q[t, h] . row in one order on every host (`qk1x32`; the dims past the last 32 one by one)."""
        D = row.shape[0]
        n = D - D % 32
        acc = qk1x32(q, t, h, row, n // 32)
        for d in range(n, D):
            acc += q[t, h, d] * row[d]
        return acc

    @njit(**JIT)
    def _qk_g4(q, t, h0, k16, kvh, slots, j0, j1, scale, sc, prefetch):
        """sc[g, j] = scale * (q[t, h0 + g] . K[kvh, slots[j]]) for the 4 heads of a GQA group and keys
        j0 <= j < j1 (j0 even), keys in pairs from j0 (`qk4x2`: each q element loaded once for 8 sums) and an
        odd last key alone (the same sums for it). One call per range: a call per key costs more than its
        arithmetic (argument reference counting)."""
        row_bytes = 2 * q.shape[2]
        n_slots = slots.shape[0]
        j = j0
        while j + 2 <= j1:
            if prefetch and j + QK_PREFETCH_KEYS + 1 < n_slots:
                prefetch_row(k16, slots[j + QK_PREFETCH_KEYS], kvh, 0, row_bytes)
                prefetch_row(k16, slots[j + QK_PREFETCH_KEYS + 1], kvh, 0, row_bytes)
            a0, a1, a2, a3, b0, b1, b2, b3 = qk4x2(q, t, h0, k16, kvh, slots[j], slots[j + 1])
            sc[0, j], sc[1, j], sc[2, j], sc[3, j] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
            sc[0, j + 1], sc[1, j + 1], sc[2, j + 1], sc[3, j + 1] = b0 * scale, b1 * scale, b2 * scale, b3 * scale
            j += 2
        if j < j1:
            a0, a1, a2, a3, _, _, _, _ = qk4x2(q, t, h0, k16, kvh, slots[j], slots[j])
            sc[0, j], sc[1, j], sc[2, j], sc[3, j] = a0 * scale, a1 * scale, a2 * scale, a3 * scale

    @njit(**JIT)
    def _order_key(bits):
        """A float32's bits (i32) -> an i32 that orders as the floats do (the magnitude bits flipped where the
        sign is set); its own inverse."""
        return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))

    @njit(**JIT)
    def _row_max(scores, g, n):
        """max of scores[g, :n] (not NaN; -inf for n = 0), as a maximum of integer keys that order as the floats
        do (a float's bits with the magnitude bits flipped where it is negative): LLVM vectorizes an integer
        maximum, where the float compare-and-select loop stayed scalar (5.7 us per 4096 scores). Where the
        maximum is a zero of either sign this returns +0.0; the scores shifted by it, and their exponentials, are
        the same either way."""
        keys = scores[g].view(np.int32)
        best = _order_key(np.int32(-8388608))  # -inf (bits 0xFF800000)
        for j in range(n):
            best = max(best, _order_key(keys[j]))
        return i32_as_f32(_order_key(best))

    @njit(**JIT)
    def _exp_sums4(scores, n):
        """Double sums of scores[0..3, :n], each in key order (the reference order), the four chains
        interleaved so that they overlap instead of waiting on one add latency after another."""
        s0 = s1 = s2 = s3 = 0.0
        for j in range(n):
            s0 += np.float64(scores[0, j])
            s1 += np.float64(scores[1, j])
            s2 += np.float64(scores[2, j])
            s3 += np.float64(scores[3, j])
        return s0, s1, s2, s3

    @njit(**JIT)
    def _exp_shifted(scores, g, n):
        """scores[g, :n] -> exp(scores - max) (the max-shifted exponentials of one head's scores)."""
        best = _row_max(scores, g, n)
        for j in range(n):  # vectorizes (kernels.expf), unlike a libm call per score
            scores[g, j] = expf_nonpositive(scores[g, j] - best)

    @njit(**JIT)
    def _normalize(scores, g, n, total, rp):
        """scores[g, :n] /= total (as a float32 multiply by 1/total), rounded to float16 if rp."""
        inv = np.float32(1.0 / total)
        for j in range(n):
            p = scores[g, j] * inv
            if rp:
                p = f16_to_f32(f32_to_f16_bits(p))  # = round_to_f16(p), in hardware
            scores[g, j] = p

    @njit(**JIT)
    def _pv_g4_block(sc, slots, jb, je, v16, kvh, acc, prefetch):
        """acc[g, i] += sum over keys jb <= j < je of sc[g, j] * V[kvh, slots[j], i], in key order, for the
        dims i below the last multiple of PV_DIMS of acc.shape[1] (`pv4`, PV_DIMS dims at a time)."""
        W = acc.shape[1] - acc.shape[1] % PV_DIMS
        # the next block's V rows (the dims this call reads), prefetched a share per slice of dims: a decode at
        # depth streams V from memory, and the hardware prefetchers alone leave p.v waiting on it
        per_slice = -(-PV_KEY_BLOCK // max(1, W // PV_DIMS))
        row_bytes = 2 * acc.shape[1]
        for c in range(0, W, PV_DIMS):
            k0 = je + (c // PV_DIMS) * per_slice
            for j in range(k0, min(k0 + per_slice, je + PV_KEY_BLOCK, slots.shape[0]) if prefetch else k0):
                prefetch_row(v16, slots[j], kvh, 0, row_bytes)
            pv4(sc, slots, jb, je, v16, kvh, c, acc, c)

    @njit(**JIT)
    def _pv_g4_tail(sc, slots, j0, j1, v16, kvh, acc):
        """The dims past the last multiple of PV_DIMS of acc.shape[1] (none for heads of 64 or 128), keys
        j0 <= j < j1 one by one (a float32 product, then its add)."""
        W = acc.shape[1]
        Wv = W - W % PV_DIMS
        for j in range(j0, j1 if Wv < W else j0):
            s0 = slots[j]
            for g in range(4):
                p = sc[g, j]
                for i in range(Wv, W):
                    acc[g, i] += p * f16_to_f32(v16[kvh, s0, i])

    @njit(**JIT)
    def _pv_g4_chunk(sc, slots, j0, j1, v16, kvh, part, prefetch):
        """part[g, i] = sum over keys j0 <= j < j1 (one p.v chunk) of sc[g, j] * V[kvh, slots[j], i], from zero,
        in key order (`pv4`: one fused multiply-add per key; the tail dims of `_pv_g4_tail`), in blocks of
        PV_KEY_BLOCK keys whose V rows stay in cache for all of the block's PV_DIMS slices."""
        part[:] = 0.0
        for jb in range(j0, j1, PV_KEY_BLOCK):
            _pv_g4_block(sc, slots, jb, min(j1, jb + PV_KEY_BLOCK), v16, kvh, part, prefetch)
        _pv_g4_tail(sc, slots, j0, j1, v16, kvh, part)

    @njit(**JIT)
    def _add_chunk(acc, part):
        """acc += part (f32[4, D]): a p.v chunk's sums added to the output's, in chunk order by the callers."""
        for g in range(acc.shape[0]):
            for i in range(acc.shape[1]):
                acc[g, i] += part[g, i]

    @njit(**JIT)
    def _token_tiles(seq_index, tile):
        """Tiles of up to `tile` consecutive tokens of one sequence -> starts: i64[n_tiles + 1]."""
        T = seq_index.shape[0]
        starts = np.empty(T + 1, np.int64)
        n = 0
        for t in range(T):
            if t == 0 or seq_index[t] != seq_index[t - 1] or t - starts[n - 1] == tile:
                starts[n] = t
                n += 1
        starts[n] = T
        return starts[:n + 1]

    @njit(**JIT)
    def _softmax(scores, n, rp):
        """scores: f32[group, >= n] -> probabilities over the first n keys of each head (in place)."""
        group = scores.shape[0]
        totals = np.zeros(group, dtype=np.float64)
        for g in range(group):
            _exp_shifted(scores, g, n)
        if group == 4:
            totals[0], totals[1], totals[2], totals[3] = _exp_sums4(scores, n)
        else:
            for g in range(group):
                for j in range(n):
                    totals[g] += np.float64(scores[g, j])
        for g in range(group):
            _normalize(scores, g, n, totals[g], rp)

    @njit(**JIT)
    def _tile_g4(q, k16, v16, positions, kvh, t0, t1, slots, scale, rp, out):
        """Tokens t0 <= t < t1 of one sequence, one KV head of a GQA group of 4, float16 cache: each block of
        keys is read for q.k (QK_KEY_BLOCK) and p.v (PV_KEY_BLOCK) once for all the tile's tokens while it
        is in L1/L2 (a prefill at depth otherwise streams the whole cache from L3 once per token). Every
        score and output element gets the same operations in the same order as a tile of one token."""
        n_tok = t1 - t0
        D = q.shape[2]
        n_max = slots.shape[0]
        scores = np.empty((n_tok, 4, n_max), dtype=np.float32)
        for jb in range(0, n_max, QK_KEY_BLOCK):
            for i in range(n_tok):
                n = positions[t0 + i] + 1
                if jb < n:
                    _qk_g4(q, t0 + i, kvh * 4, k16, kvh, slots, jb, min(n, jb + QK_KEY_BLOCK), scale, scores[i],
                           i == 0)
        for i in range(n_tok):
            _softmax(scores[i], positions[t0 + i] + 1, rp)
        acc = np.zeros((n_tok, 4, D), dtype=np.float32)
        part = np.empty((n_tok, 4, D), dtype=np.float32)
        for cs in range(0, n_max, PV_CHUNK_KEYS):  # p.v chunk by chunk (`_pv_g4_chunk`'s order)
            ce = min(n_max, cs + PV_CHUNK_KEYS)
            part[:] = 0.0
            for jb in range(cs, ce, PV_KEY_BLOCK):
                for i in range(n_tok):
                    n = positions[t0 + i] + 1
                    if jb < n:
                        _pv_g4_block(scores[i], slots, jb, min(n, jb + PV_KEY_BLOCK), v16, kvh, part[i], i == 0)
            for i in range(n_tok):
                n = positions[t0 + i] + 1
                if cs < n:
                    _pv_g4_tail(scores[i], slots, cs, min(n, ce), v16, kvh, part[i])
                    _add_chunk(acc[i], part[i])
        for i in range(n_tok):
            for g in range(4):
                for d in range(D):
                    out[t0 + i, kvh * 4 + g, d] = acc[i, g, d]

    @njit(**JIT_PARALLEL)
    def paged_attention_tiled(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                              round_probs, scale, out, tile):
        """paged_attention_fast with up to `tile` consecutive tokens of a sequence per task (GQA groups of 4,
        float16 cache; one token per task otherwise). Results do not depend on `tile` (tested)."""
        T, H, D = q.shape
        KVH = k32.shape[0] if use_f32 else k16.shape[0]
        group = H // KVH
        fast4 = group == 4 and not use_f32  # 2B-4T, Llama-3-8B: four query heads per f16 K/V head
        starts = _token_tiles(seq_index, tile if fast4 else 1)
        n_tiles = starts.shape[0] - 1
        for task in prange(n_tiles * KVH):
            t0, t1 = starts[task // KVH], starts[task // KVH + 1]
            kvh = task % KVH
            s = seq_index[t0]
            n = 0
            for t in range(t0, t1):
                n = max(n, positions[t] + 1)
            slots = np.empty(n, dtype=np.int64)
            for j in range(n):
                slots[j] = np.int64(block_tables[s, j // block_size]) * block_size + j % block_size
            if fast4:
                _tile_g4(q, k16, v16, positions, kvh, t0, t1, slots, scale, round_probs[s], out)
                continue
            t = t0  # one token: K/V rows widened once for the group's query heads
            scores = np.empty((group, n), dtype=np.float32)
            row = np.empty(D, dtype=np.float32)
            for j in range(n):
                _load_row(k16, k32, use_f32, slots[j], kvh, row)
                for g in range(group):
                    scores[g, j] = _dot(q, t, kvh * group + g, row) * scale
            _softmax(scores, n, round_probs[s])
            acc = np.zeros((group, D), dtype=np.float32)
            for j in range(n):
                _load_row(v16, v32, use_f32, slots[j], kvh, row)
                for g in range(group):
                    p = scores[g, j]
                    for d in range(D):
                        acc[g, d] += p * row[d]
            for g in range(group):
                for d in range(D):
                    out[t, kvh * group + g, d] = acc[g, d]

    def token_tile(n_tokens, n_kv_head, n_threads):
        """Tokens per task of paged_attention_tiled: up to TOKENS_PER_TASK, fewer where tiles would leave fewer
        than MIN_TASKS_PER_THREAD tasks per thread."""
        return max(1, min(TOKENS_PER_TASK, (n_tokens * n_kv_head) // (MIN_TASKS_PER_THREAD * n_threads)))

    def paged_attention_fast(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                             round_probs, scale, lut, out):
        """Same contract as kernels.attention.paged_attention (lut is unused). One task per (tile of up to
        TOKENS_PER_TASK consecutive tokens of a sequence, KV head): each K/V row is widened once for the
        `group` query heads that share it, and read once for the tile's tokens. 30 layers of a 128-token
        prefill at 4096 keys, 2 threads, one cache per layer: 3.6-3.7 s with one token per task, 2.8 s with
        tiles of 4, 2.5-2.6 s with tiles of 8. (Python: numba's thread count inside a kernel would keep it out
        of the on-disk cache.)"""
        KVH = k32.shape[0] if use_f32 else k16.shape[0]
        paged_attention_tiled(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                              round_probs, scale, out, token_tile(q.shape[0], KVH, get_num_threads()))


else:
    from .attention import paged_attention as paged_attention_fast  # noqa: F401
