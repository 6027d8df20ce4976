"""Attention for few long sequences (decode at long contexts): the work of kernels.attention_fast split in
three parallel phases so that all threads share it, with the same arithmetic per score, probability and
output element (bit-identical results, tested).

kernels.attention_fast runs one task per (token, KV head): a decode step of one sequence of 2B-4T has 5 tasks,
so 2 threads run 3 + 2 of them, and 90 threads leave 85 idle. Here, for float16 caches and GQA groups of 4:
1. scores: one task per (token, KV head, chunk of KEY_CHUNK keys); q.k as attention_fast (`_qk_g4`: keys in
   pairs from the first, the same pairing since chunks start at even keys);
2. softmax: one task per (token, query head): max, exponentials, the double sum in key order, normalization;
3. p.v: one task per (token, KV head, one of PV_RUNS runs of chunks of PV_CHUNK_KEYS keys): each chunk's sums
   (`_pv_g4_chunk`, whole V rows) into a buffer, then
4. one task per (token, KV head) adds the chunks' sums in order, as attention_fast does as it goes.
`choose_attention` (once per step) picks this path when (token, KV head) tasks are scarce and contexts long, or
for decode steps at long contexts (SPLIT_LONG_KEYS); attention_fast otherwise. The choice never changes results.
The split runs five parallel regions and passes scores through memory, but keeps every thread busy:
`python scripts/bench_attention.py -t 2 --layer-caches`, 30 layers each with its own cache, one decode step at
4096 keys: 35.4 ms split against 48.5 fast; on a 16-core Xeon (one cache for all layers) 9.0 against 19.4.
"""
import numba
import numpy as np
from numba import njit, prange

from .config import JIT_PARALLEL
from .simd import HAVE_F16C

KEY_CHUNK = 256  # keys per q.k task (even: q.k pairs keys)
PV_RUNS = 4  # p.v tasks per (token, KV head): runs of whole V rows (30 layers at 4096 keys, 2 threads, from memory:
# 16.9 ms as 4 slices of 32 dims over all keys, one cache line of each row per task; 12 ms as 4 runs of 1024 keys;
# 13.3 as 16 of 256)
SPLIT_MIN_KEYS = 256  # split only when some token sees at least this many keys ...
SPLIT_THREADS_PER_TASK = 2  # ... and there are at least this many threads per (token, KV head) task
SPLIT_MAX_SCORE_BYTES = 64 << 20  # ... and the scores of all tokens fit in this many bytes
SPLIT_LONG_KEYS = 2048  # also split decode steps (few tokens) whose tokens see this many keys on average ...
SPLIT_LONG_MAX_TOKENS = 8  # ... with at most this many tokens in the step ...
SPLIT_LONG_MAX_TASKS_PER_THREAD = 4  # ... and fewer (token, KV head) tasks than this per thread

if HAVE_F16C:
    from .attention_fast import (PV_CHUNK_KEYS, _add_chunk, _exp_shifted, _normalize, _pv_g4_chunk, _qk_g4,
                                 paged_attention_fast)

    @njit(**JIT_PARALLEL)
    def paged_attention_split_g4(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                                 round_probs, scale, lut, out):
        """Same contract as kernels.attention.paged_attention, for float16 caches (use_f32 False; k32, v32 and
        lut unused) and H = 4 * KVH: q: f32[T, H, D]; k16, v16: u16[KVH, n_slots, D] float16 bits."""
        T, H, D = q.shape
        KVH = k16.shape[0]
        n_max = 0
        chunk_offs = np.zeros(T + 1, np.int64)  # token t's key chunks: [chunk_offs[t], chunk_offs[t + 1])
        for t in range(T):
            n = positions[t] + 1
            n_max = max(n_max, n)
            chunk_offs[t + 1] = chunk_offs[t] + (n + KEY_CHUNK - 1) // KEY_CHUNK
        chunk_token = np.empty(chunk_offs[T], np.int64)
        for t in range(T):
            for c in range(chunk_offs[t], chunk_offs[t + 1]):
                chunk_token[c] = t
        slots = np.zeros((T, n_max), np.int64)  # past a token's keys: slot 0, a valid row for the K/V prefetches
        scores = np.empty((T, H, n_max), np.float32)  # C order: scores[t][h0:h0 + 4] stays contiguous
        for c in prange(chunk_offs[T]):  # 0. slots of each chunk's keys
            t = chunk_token[c]
            s, n = seq_index[t], positions[t] + 1
            j0 = (c - chunk_offs[t]) * KEY_CHUNK
            for j in range(j0, min(n, j0 + KEY_CHUNK)):
                slots[t, j] = np.int64(block_tables[s, j // block_size]) * block_size + j % block_size
        for task in prange(chunk_offs[T] * KVH):  # 1. q.k
            c, kvh = task // KVH, task % KVH
            t = chunk_token[c]
            n = positions[t] + 1
            j0 = (c - chunk_offs[t]) * KEY_CHUNK
            sc = scores[t][kvh * 4:kvh * 4 + 4]
            _qk_g4(q, t, kvh * 4, k16, kvh, slots[t], j0, min(n, j0 + KEY_CHUNK), scale, sc, True)
        for task in prange(T * H):  # 2. softmax per query head
            t, h = task // H, task % H
            n = positions[t] + 1
            sc = scores[t][h:h + 1]
            _exp_shifted(sc, 0, n)
            total = 0.0
            for j in range(n):
                total += np.float64(sc[0, j])
            _normalize(sc, 0, n, total, round_probs[seq_index[t]])
        n_chunks = (n_max + PV_CHUNK_KEYS - 1) // PV_CHUNK_KEYS
        per_run = (n_chunks + PV_RUNS - 1) // PV_RUNS  # chunks per p.v task
        n_runs = (n_chunks + per_run - 1) // per_run
        parts = np.empty((T, KVH, n_chunks, 4, D), np.float32)  # each chunk's p.v sums
        for task in prange(T * KVH * n_runs):  # 3. p.v per run of chunks (whole V rows)
            t, rest = task // (KVH * n_runs), task % (KVH * n_runs)
            kvh, run = rest // n_runs, rest % n_runs
            n = positions[t] + 1
            sc = scores[t][kvh * 4:kvh * 4 + 4]
            last = min((run + 1) * per_run, (n + PV_CHUNK_KEYS - 1) // PV_CHUNK_KEYS)
            for c in range(run * per_run, last):
                j0 = c * PV_CHUNK_KEYS
                _pv_g4_chunk(sc, slots[t], j0, min(n, j0 + PV_CHUNK_KEYS), v16, kvh, parts[t, kvh, c], True)
        for task in prange(T * KVH):  # 4. the chunks' sums in order
            t, kvh = task // KVH, task % KVH
            acc = np.zeros((4, D), np.float32)
            for c in range((positions[t] + PV_CHUNK_KEYS) // PV_CHUNK_KEYS):
                _add_chunk(acc, parts[t, kvh, c])
            out[t, kvh * 4:kvh * 4 + 4] = acc

    def choose_attention(n_tokens, n_head, n_kv_head, use_f32, n_keys_max, n_threads, n_keys_mean=None):
        """The kernel for a step (one choice for all layers; both give the same results): the split kernel for
        float16 caches, GQA groups of 4 and long contexts when (token, KV head) tasks would leave threads idle,
        or when a decode step's tokens see SPLIT_LONG_KEYS keys on average (2B-4T on 2 threads at 4000 keys, the
        Zen 3 VM of earlier sessions: one sequence 9.1 -> 10.3 tok/s, four 14.7 -> 16.1, the one measurement that
        disagrees with the task limit below; with K/V prefetched, one sequence at 2000 keys:
        12.9 / 12.5 / 13.6 tok/s split against 11.9 / 11.1 / 13.5 fast, mixed at 1000), unless the step has
        SPLIT_LONG_MAX_TASKS_PER_THREAD (token, KV head) tasks per thread (then attention_fast keeps every thread
        busy without the split's extra passes: on a 2-vCPU Intel Xeon, 30 layers at 4096 keys with their own caches
        took 102 / 199 / 383 ms fast against 113 / 235 / 461 split for 2 / 4 / 8 sequences, 64 against 58 for one;
        4 sequences at depth 4000 decoded 1.084x faster in one process, 6 of 6 rounds); attention_fast
        otherwise."""
        n_keys_mean = n_keys_max if n_keys_mean is None else n_keys_mean
        if (not use_f32 and n_head == 4 * n_kv_head and n_keys_max >= SPLIT_MIN_KEYS
                and n_tokens * n_head * n_keys_max * 4 <= SPLIT_MAX_SCORE_BYTES
                and (n_tokens * n_kv_head * SPLIT_THREADS_PER_TASK <= n_threads
                     or (n_tokens <= SPLIT_LONG_MAX_TOKENS and n_keys_mean >= SPLIT_LONG_KEYS
                         and n_tokens * n_kv_head < SPLIT_LONG_MAX_TASKS_PER_THREAD * n_threads))):
            return paged_attention_split_g4
        return paged_attention_fast

    def paged_attention_auto(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size,
                             round_probs, scale, lut, out):
        """Same contract as kernels.attention.paged_attention; the kernel `choose_attention` picks."""
        T, H, _ = q.shape
        kvh = k32.shape[0] if use_f32 else k16.shape[0]
        kernel = choose_attention(T, H, kvh, use_f32, int(positions.max()) + 1 if T else 0, numba.get_num_threads(),
                                  float(positions.mean()) + 1 if T else 0.0)
        kernel(q, k16, v16, k32, v32, use_f32, positions, seq_index, block_tables, block_size, round_probs, scale,
               lut, out)
else:
    from .attention_fast import paged_attention_fast as paged_attention_auto  # noqa: F401

    def choose_attention(n_tokens, n_head, n_kv_head, use_f32, n_keys_max, n_threads, n_keys_mean=None):
        return paged_attention_auto
