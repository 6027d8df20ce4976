"""Every layer of a decode step (up to MAX_TOKENS tokens) in ONE parallel region (base-3 weights, float16 cache, GQA
groups of 4): the work of kernels.layer_steps.decode_layers, same kernels, same bits, without its ~150 region
starts and ends.

Each layer is five phases in order (six for steps of several tokens, nine with the split attention); a phase's
tasks are handed out as the matmuls hand out theirs (kernels.tasks.next_task: a thread's own run first, then
halves of the others'), and a thread that has no task left waits until every task of the phase is done
(`_finish`: a counter per phase, kernels.atomics.atomic_add):

  QKV    q, k, v = Wq h, Wk h, Wv h             (16-row tiles of the three weights)
  ATTN   per token and KV head: rope on its 4 query heads and its key head, its k and v into the cache, then
         (one-token steps) its attention (kernels.kv_store.rope_store_f16 on the head's slices,
         kernels.attention_fast._tile_g4); steps of several tokens attend in a TILE phase of their own, once every
         token's k and v are stored (two tokens of one sequence: the second attends to the first); where a
         one-token step takes the split attention (kernels.attention_split.choose_attention: long contexts, or
         many threads), ATTN is only rope and store, and four phases follow, the split kernel's passes:
         QK (key chunks x KV heads), SOFTMAX (query heads), PV (runs of chunks x KV heads), SUM (KV heads)
  WO     y = Wo a                                (tiles)
  FFN    gate, up = Wgate h2, Wup h2             (tiles)
  DOWN   x' = x + y + Wdown f                    (tiles; each writes its rows of x')

The small row steps between the phases (norms, activation quantization, the FFN activation) are computed by
every thread into its own buffers, from inputs final at that point: h = rms(x) attn_norm, a = rms(attn)
attn_sub_norm, x + y, f = act(gate, up) (sub-normed): no thread waits for one thread to do them.

Why no deadlock and no stale data, whichever threads run and when (a thread may start late, or never):
- a thread waits only for tasks that are claimed (it claims every unclaimed one first), and a claimed task is
  being run by a thread that is running;
- the shared arrays a phase writes (q k v, the cache rows, attn, y, gate up, x') are written again only by the
  same phase of a later layer (x' alternates between two buffers), which cannot start before this phase's
  tasks are all done. A thread reads a phase's inputs after that phase's producers are done and before it
  claims a task of it, so any task it claims ran on final inputs. A late thread may compute its own buffers
  from rewritten inputs, but then every task is claimed and it writes nothing.

On the 2-vCPU Intel Xeon, the 210 matmuls of a 2B-4T token (0.42 GB) took 23.1 ms in one region with these
waits against 24.6 ms as ~120 parallel regions (synthetic probe, one process, 5 alternated rounds). In the model
(`scripts/bench_ab.py -m out/2b4t-i2s.gguf -t 2 -n 32 -p 16 --top-k 1 --same-top-k --against a82afea`): greedy
decode 1.067x (8 of 8 rounds), 1.077x at depth 4000 with the split phases (against decode_layers' split kernel).
"""
import numpy as np
from numba import njit, prange

from .activations import relu2_mul, silu_mul
from .amx import prefetch_lines
from .atomics import atomic_add, atomic_load
from .b3_simd import HAVE_B3, TILE_ROWS, padded_k
from .config import JIT, JIT_PARALLEL
from .norms import rms_norm
from .pointers import sched_yield, u8_at
from .quantize import quantize_rows_i8
from .simd import HAVE_F16C
from .tasks import RANGE_STRIDE, n_tasks3, next_task, set_task_ranges, task3
from .ternary_matmul import AMX_MIN_TOKENS

HAVE_LAYER_REGION = HAVE_B3 and HAVE_F16C
QKV, ATTN, TILE, QK, SOFTMAX, PV, SUM, WO, FFN, DOWN = range(10)
PHASES = 10  # TILE: steps of several tokens; QK .. SUM: the split attention's; they have no tasks otherwise
MAX_TOKENS = AMX_MIN_TOKENS - 1  # steps of more tokens take AMX tiles in the matmuls (kernels.b3_matmul)
WQ, WK, WV, WO_, WGATE, WUP, WDOWN = range(7)  # columns of the weight tables
SPINS = 4000  # a waiting thread checks this many times (~tens of us), then yields its core between checks
PREFETCH_BYTES = 32768  # of each thread's next weights, before the row steps that precede their phase
COUNTER_STRIDE = 8  # int64 words between two phases' done counters (one 64-byte line each)


@njit(**JIT)
def _finish(done, phase, mine, n_tasks):
    """Add this thread's finished tasks to the phase's counter, then wait until all n_tasks are done."""
    i = phase * COUNTER_STRIDE
    if mine:
        atomic_add(done, i, mine)
    spins = 0
    while atomic_load(done, i) < n_tasks:
        spins += 1
        if spins > SPINS:
            sched_yield()


if HAVE_LAYER_REGION:
    from .attention_fast import PV_CHUNK_KEYS, _add_chunk, _exp_shifted, _normalize, _pv_g4_chunk, _qk_g4, _tile_g4
    from .attention_split import KEY_CHUNK, PV_RUNS
    from .b3_matmul import _rows_b3, padded_activations
    from .kv_store import rope_store_f16

    @njit(**JIT)
    def _prefetch_front(w, workers, n_bytes, p0, n0, p1, n1, p2, n2):
        """Prefetch into L2 the first n_bytes of thread w's static run of a phase's tasks (16-row tiles of up to
        three weights p0, p1, p2 of n0, n1, n2 tiles; tasks in that order, kernels.tasks.task_ranges), so that
        memory keeps streaming while the thread does the row steps before the phase."""
        first = w * (n0 + n1 + n2) // workers
        j, lo, _ = task3(first, 1, n0, n1, n2)
        p, n = (p0, n0) if j == 0 else ((p1, n1) if j == 1 else (p2, n2))
        if n == 0:
            return
        start = lo * (p.shape[0] // n)
        prefetch_lines(p, start, min(n_bytes, p.shape[0] - start) // 64)

    @njit(**JIT)
    def _split_attention(w, ranges, done, base, q, k16, v16, key_slots, scale, rp, scores, parts, per_run, attn):
        """The split attention's passes for one token as four phases (kernels.attention_split.
        paged_attention_split_g4's arithmetic): scores: f32[H, n]; parts: f32[KVH, n_chunks, 4, D]."""
        n = key_slots.shape[0]
        KVH, n_chunks = parts.shape[0], parts.shape[1]
        H = scores.shape[0]
        n_qk = (n + KEY_CHUNK - 1) // KEY_CHUNK * KVH
        mine = 0
        task = next_task(ranges[base + QK], w)
        while task >= 0:
            c, kvh = task // KVH, task % KVH
            j0 = c * KEY_CHUNK
            _qk_g4(q, 0, kvh * 4, k16, kvh, key_slots, j0, min(n, j0 + KEY_CHUNK), scale, scores[kvh * 4:kvh * 4 + 4],
                   True)
            mine += 1
            task = next_task(ranges[base + QK], w)
        _finish(done, base + QK, mine, n_qk)
        mine = 0
        task = next_task(ranges[base + SOFTMAX], w)
        while task >= 0:
            sc = scores[task:task + 1]
            _exp_shifted(sc, 0, n)
            total = 0.0
            for j in range(n):
                total += np.float64(sc[0, j])
            _normalize(sc, 0, n, total, rp)
            mine += 1
            task = next_task(ranges[base + SOFTMAX], w)
        _finish(done, base + SOFTMAX, mine, H)
        n_runs = (n_chunks + per_run - 1) // per_run
        mine = 0
        task = next_task(ranges[base + PV], w)
        while task >= 0:
            kvh, run = task // n_runs, task % n_runs
            for c in range(run * per_run, min((run + 1) * per_run, n_chunks)):
                j0 = c * PV_CHUNK_KEYS
                _pv_g4_chunk(scores[kvh * 4:kvh * 4 + 4], key_slots, j0, min(n, j0 + PV_CHUNK_KEYS), v16, kvh,
                             parts[kvh, c], True)
            mine += 1
            task = next_task(ranges[base + PV], w)
        _finish(done, base + PV, mine, KVH * n_runs)
        mine = 0
        task = next_task(ranges[base + SUM], w)
        while task >= 0:
            acc = np.zeros((4, attn.shape[2]), np.float32)
            for c in range(n_chunks):
                _add_chunk(acc, parts[task, c])
            attn[0, task * 4:task * 4 + 4] = acc
            mine += 1
            task = next_task(ranges[base + SUM], w)
        _finish(done, base + SUM, mine, KVH)

    @njit(**JIT)
    def _fused_phase(w, ranges, done, phase, p0, p1, p2, qp, sc, su, s0, s1, s2, o0, o1, o2, sums):
        """Two or three weights on the same activations as a phase (q/k/v, gate/up; p2 may be u8[0] with o2 f32[T,
        0]): o_j = W_j q, their 16-row tiles in weight order (kernels.tasks.task3)."""
        T = o0.shape[0]
        n0, n1, n2 = o0.shape[1] // TILE_ROWS, o1.shape[1] // TILE_ROWS, o2.shape[1] // TILE_ROWS
        mine = 0
        task = next_task(ranges[phase], w)
        while task >= 0:
            j, lo, hi = task3(task, 1, n0, n1, n2)
            if j == 0:
                _rows_b3(p0, qp, T, sc, su, s0, o0, lo, hi, sums)
            elif j == 1:
                _rows_b3(p1, qp, T, sc, su, s1, o1, lo, hi, sums)
            else:
                _rows_b3(p2, qp, T, sc, su, s2, o2, lo, hi, sums)
            mine += 1
            task = next_task(ranges[phase], w)
        _finish(done, phase, mine, n_tasks3(1, n0, n1, n2))

    @njit(**JIT)
    def _weight_phase(w, ranges, done, phase, packed, qp, sc, su, scale, out, sums, x_in, x_out):
        """One weight's 16-row tiles as a phase: out = W q; where x_in has rows, each task also writes
        x_out[:, its rows] = x_in + out (the residual)."""
        T = out.shape[0]
        mine = 0
        task = next_task(ranges[phase], w)
        while task >= 0:
            _rows_b3(packed, qp, T, sc, su, scale, out, task, task + 1, sums)
            if x_in.shape[0]:
                for t in range(T):
                    for i in range(task * TILE_ROWS, task * TILE_ROWS + TILE_ROWS):
                        x_out[t, i] = x_in[t, i] + out[t, i]
            mine += 1
            task = next_task(ranges[phase], w)
        _finish(done, phase, mine, out.shape[1] // TILE_ROWS)

    @njit(**JIT)
    def _quantize(x, floor, q, scales, sums):
        """x: f32[T, K] -> q (i8[T, >= K]: its first K columns), scales, sums; -> the activations padded for the
        base-3 rows (q itself where it has their padded width and zeros past K)."""
        quantize_rows_i8(x, floor, q, scales, sums)
        return padded_activations(q, q.shape[0])

    @njit(**JIT)
    def _weight(addrs, sizes, layer, j):
        return u8_at(addrs[layer, j], sizes[layer, j])

    @njit(**JIT)
    def _worker(w, ranges, done, xs, q, k, v, attn, y, gate, up, addrs, sizes, scales, attn_norms, attn_sub_norms,
                ffn_norms, ffn_sub_norms, floors, eps, relu2, positions, cos, sin, neox, n_dims, slots, key_slots,
                k_caches, v_caches, rp, scale, workers, pf, split, scores, parts, per_run):
        """Thread w's part of every layer (module docstring); xs: f32[2, T, E], layer l reads xs[l % 2]."""
        L = addrs.shape[0]
        T, E = xs.shape[1], xs.shape[2]
        HD = q.shape[1] * q.shape[2]
        KD = k.shape[1] * k.shape[2]
        F = gate.shape[1]
        KVH = k.shape[1]
        n_q, n_kv, n_e, n_f = HD // TILE_ROWS, KD // TILE_ROWS, E // TILE_ROWS, F // TILE_ROWS
        q2, k2, v2 = q.reshape(T, HD), k.reshape(T, KD), v.reshape(T, KD)
        sums = np.empty(4 * TILE_ROWS, np.int32)
        h = np.empty((T, E), np.float32)
        a = np.empty((T, HD), np.float32)
        xm = np.empty((T, E), np.float32)
        f = np.empty((T, F), np.float32)
        yd = np.empty((T, E), np.float32)
        # activation codes with the base-3 rows' zero padding (K to whole super-blocks: 6912 -> 7040) in place:
        # quantized into their first columns, used as they are (no padded copy per layer)
        qe, qa = np.zeros((T, padded_k(E)), np.int8), np.zeros((T, padded_k(HD)), np.int8)
        qf = np.zeros((T, padded_k(F)), np.int8)
        sc, su = np.empty(T, np.float32), np.empty(T, np.int32)
        tiles = not split and T > 1  # attention in its own phase, after every token's k and v are stored
        none = np.empty((0, E), np.float32)
        no_weight, no_rows = np.empty(0, np.uint8), np.empty((T, 0), np.float32)
        for l in range(L):
            base = l * PHASES
            xc, xn = xs[l % 2], xs[(l + 1) % 2]
            floor = floors[l]
            # QKV
            wq, wk, wv = _weight(addrs, sizes, l, WQ), _weight(addrs, sizes, l, WK), _weight(addrs, sizes, l, WV)
            _prefetch_front(w, workers, pf, wq, n_q, wk, n_kv, wv, n_kv)
            rms_norm(xc, attn_norms[l], eps, h)
            qp = _quantize(h, floor, qe, sc, su)
            _fused_phase(w, ranges, done, base + QKV, wq, wk, wv, qp, sc, su, scales[l, WQ], scales[l, WK],
                         scales[l, WV], q2, k2, v2, sums)
            # ATTN
            wo = _weight(addrs, sizes, l, WO_)
            _prefetch_front(w, workers, pf, wo, n_e, wo, 0, wo, 0)
            mine = 0
            task = next_task(ranges[base + ATTN], w)
            while task >= 0:
                t, g = task // KVH, task % KVH
                rope_store_f16(q[t:t + 1, 4 * g:4 * g + 4], k[t:t + 1, g:g + 1], v[t:t + 1, g:g + 1],
                               positions[t:t + 1], cos, sin, neox, n_dims, slots[t:t + 1], k_caches[l, g:g + 1],
                               v_caches[l, g:g + 1])
                if not (split or tiles):
                    _tile_g4(q, k_caches[l], v_caches[l], positions, g, 0, 1, key_slots[0], scale, rp[0], attn)
                mine += 1
                task = next_task(ranges[base + ATTN], w)
            _finish(done, base + ATTN, mine, T * KVH)
            if tiles:
                mine = 0
                task = next_task(ranges[base + TILE], w)
                while task >= 0:
                    t, g = task // KVH, task % KVH
                    _tile_g4(q, k_caches[l], v_caches[l], positions, g, t, t + 1, key_slots[t, :positions[t] + 1],
                             scale, rp[t], attn)
                    mine += 1
                    task = next_task(ranges[base + TILE], w)
                _finish(done, base + TILE, mine, T * KVH)
            if split:
                _split_attention(w, ranges, done, base, q, k_caches[l], v_caches[l], key_slots[0], scale, rp[0],
                                 scores, parts, per_run, attn)
            # WO
            a[:] = attn.reshape(T, HD)
            if attn_sub_norms.shape[1]:
                rms_norm(a, attn_sub_norms[l], eps, a)
            qp = _quantize(a, floor, qa, sc, su)
            _weight_phase(w, ranges, done, base + WO, wo, qp, sc, su, scales[l, WO_], y, sums, none, none)
            # FFN
            wg, wu = _weight(addrs, sizes, l, WGATE), _weight(addrs, sizes, l, WUP)
            _prefetch_front(w, workers, pf, wg, n_f, wu, n_f, wu, 0)
            for t in range(T):
                for i in range(E):
                    xm[t, i] = xc[t, i] + y[t, i]
            rms_norm(xm, ffn_norms[l], eps, h)
            qp = _quantize(h, floor, qe, sc, su)
            _fused_phase(w, ranges, done, base + FFN, wg, wu, no_weight, qp, sc, su, scales[l, WGATE], scales[l, WUP],
                         scales[l, WUP], gate, up, no_rows, sums)
            # DOWN
            wd = _weight(addrs, sizes, l, WDOWN)
            _prefetch_front(w, workers, pf, wd, n_e, wd, 0, wd, 0)
            if relu2:
                relu2_mul(gate, up, f)
            else:
                silu_mul(gate, up, f)
            if ffn_sub_norms.shape[1]:
                rms_norm(f, ffn_sub_norms[l], eps, f)
            qp = _quantize(f, floor, qf, sc, su)
            _weight_phase(w, ranges, done, base + DOWN, wd, qp, sc, su, scales[l, WDOWN], yd, sums, xm, xn)

    @njit(**JIT_PARALLEL)
    def decode_step_layers(x, addrs, sizes, scales, attn_norms, attn_sub_norms, ffn_norms, ffn_sub_norms, floors,
                            eps, relu2, positions, cos, sin, neox, n_dims, slots, k_caches, v_caches, seq_index,
                            block_tables, block_size, round_probs, scale, split, n_head, n_threads):
        """A decode step of T <= MAX_TOKENS tokens (x: f32[T, E], updated in place) through every layer; split (the
        split attention's passes) only where T == 1. addrs, sizes: i64[L, 7] the base-3 weights' addresses and
        byte sizes (columns WQ .. WDOWN; the caller keeps the arrays alive); scales: f32[L, 7]; attn_norms,
        ffn_norms: f32[L, E]; attn_sub_norms: f32[L, H*D] and ffn_sub_norms: f32[L, F], or [L, 0] where the arch
        has none; floors: f64[L] activation floors; relu2: squared-ReLU gate, else SiLU; k_caches, v_caches:
        u16[L, KVH, n_slots, D] with n_head == 4 KVH; the rest as layer_steps.decode_layers. n_threads: numba's
        thread count (the workers)."""
        L, T, E = addrs.shape[0], x.shape[0], x.shape[1]
        KVH, D = k_caches.shape[1], k_caches.shape[3]
        F = sizes[0, WGATE] * 5 // padded_k(E) if L else 0
        xs = np.empty((2, T, E), np.float32)
        xs[0] = x
        q = np.empty((T, n_head, D), np.float32)
        k = np.empty((T, KVH, D), np.float32)
        v = np.empty((T, KVH, D), np.float32)
        attn = np.empty((T, n_head, D), np.float32)
        y = np.empty((T, E), np.float32)
        gate = np.empty((T, F), np.float32)
        up = np.empty((T, F), np.float32)
        n = 0
        for t in range(T):
            n = max(n, positions[t] + 1)
        key_slots = np.zeros((T, n), np.int64)  # each token's keys, the same in every layer
        rp = np.empty(T, np.bool_)
        for t in range(T):
            s = seq_index[t]
            rp[t] = round_probs[s]
            for j in range(positions[t] + 1):
                key_slots[t, j] = np.int64(block_tables[s, j // block_size]) * block_size + j % block_size
        workers = max(1, n_threads)
        n_e, n_f, n_kv = E // TILE_ROWS, F // TILE_ROWS, KVH * D // TILE_ROWS
        n_chunks = (n + PV_CHUNK_KEYS - 1) // PV_CHUNK_KEYS if split else 0
        per_run = (n_chunks + PV_RUNS - 1) // PV_RUNS if split else 1
        n_runs = (n_chunks + per_run - 1) // per_run
        scores = np.empty((n_head if split else 0, n), np.float32)
        parts = np.empty((KVH, n_chunks, 4, D), np.float32)  # each chunk's p.v sums
        n_qk = (n + KEY_CHUNK - 1) // KEY_CHUNK * KVH if split else 0
        counts = (n_tasks3(1, n_head * D // TILE_ROWS, n_kv, n_kv), T * KVH, T * KVH if T > 1 and not split else 0,
                  n_qk, n_head if split else 0, KVH * n_runs, KVH if split else 0, n_e, 2 * n_f, n_e)
        ranges = np.empty((L * PHASES, workers * RANGE_STRIDE), np.int64)  # 3.5 MB at 180 threads: not zeroed
        for l in range(L):
            for p in range(PHASES):
                set_task_ranges(ranges[l * PHASES + p], counts[p])
        done = np.zeros(L * PHASES * COUNTER_STRIDE, np.int64)
        for w in prange(workers):
            _worker(w, ranges, done, xs, q, k, v, attn, y, gate, up, addrs, sizes, scales, attn_norms,
                    attn_sub_norms, ffn_norms, ffn_sub_norms, floors, eps, relu2, positions, cos, sin, neox, n_dims,
                    slots, key_slots, k_caches, v_caches, rp, scale, workers, PREFETCH_BYTES, split, scores, parts,
                    per_run)
        x[:] = xs[L % 2]


def region_tables(steps: list) -> tuple:
    """The model's per-layer arguments of layer_steps (bitnet_py.model.Model._plan_layer_steps: (pre, post) per
    layer) -> decode_step_layers' (addrs, sizes, scales, attn_norms, attn_sub_norms, ffn_norms, ffn_sub_norms,
    floors, eps, relu2). The weight arrays must outlive the tables (the model holds them)."""
    weights = [(p[2], p[3], p[4], o[1], o[4], o[5], o[6]) for p, o in steps]
    addrs = np.array([[w.ctypes.data for w in ws] for ws in weights], np.int64).reshape(len(steps), 7)
    sizes = np.array([[w.size for w in ws] for ws in weights], np.int64).reshape(len(steps), 7)
    scales = np.array([(p[5], p[6], p[7], o[2], o[7], o[8], o[9]) for p, o in steps], np.float32).reshape(-1, 7)

    def stack(vectors):
        return np.ascontiguousarray(np.stack(vectors).astype(np.float32, copy=False))

    return (addrs, sizes, scales, stack([p[0] for p, _ in steps]), stack([o[0] for _, o in steps]),
            stack([o[3] for _, o in steps]), stack([o[10] for _, o in steps]),
            np.array([p[8] for p, _ in steps], np.float64), steps[0][1][12], steps[0][1][13])
