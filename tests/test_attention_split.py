"""kernels/attention_split.py: bit-identical to kernels/attention_fast.py (same arithmetic per element, work
split differently), close to the numpy reference, and chosen by paged_attention_auto only where it should."""
import sys
from pathlib import Path

import numpy as np
import pytest

import naive
from conftest import REPO as ROOT, load_script
from kernels.simd import HAVE_F16C

pytestmark = pytest.mark.skipif(not HAVE_F16C, reason="the split kernel needs hardware float16 conversion")

RNG = np.random.default_rng(2024)


def _case(D, KVH, positions, seqs, bs=16):
    H = 4 * KVH
    n_blocks = sum((int(max(p for p, s in zip(positions, seqs) if s == i)) // bs + 1) for i in set(seqs))
    k = RNG.standard_normal((n_blocks * bs, KVH, D)).astype(np.float16)
    v = RNG.standard_normal((n_blocks * bs, KVH, D)).astype(np.float16)
    perm = RNG.permutation(n_blocks).astype(np.int32)  # blocks scattered over the cache
    tables, used = [], 0
    for i in range(max(seqs) + 1):
        need = int(max(p for p, s in zip(positions, seqs) if s == i)) // bs + 1
        tables.append(list(perm[used:used + need]))
        used += need
    width = max(len(r) for r in tables)
    tables = np.array([r + [-1] * (width - len(r)) for r in tables], np.int32)
    q = RNG.standard_normal((len(positions), H, D)).astype(np.float16).astype(np.float32)
    return q, k, v, np.array(positions, np.int32), np.array(seqs, np.int32), tables, bs


def _chunked_pv(p, v):
    """The documented p.v order of the GQA-4 float16 path (kernels.attention_fast.PV_CHUNK_KEYS): p: f32[n],
    v: f32[n, D] -> f32[D]: each chunk summed from zero by one fused multiply-add per key (float64 product and
    sum, exact at these magnitudes, then one float32 rounding), the chunks' sums added in order."""
    from kernels.attention_fast import PV_CHUNK_KEYS
    acc = np.zeros(v.shape[1], np.float32)
    for c0 in range(0, len(p), PV_CHUNK_KEYS):
        part = np.zeros(v.shape[1], np.float32)
        for j in range(c0, min(len(p), c0 + PV_CHUNK_KEYS)):
            part = (np.float64(p[j]) * v[j].astype(np.float64) + part.astype(np.float64)).astype(np.float32)
        acc = acc + part
    return acc


@pytest.mark.parametrize("kernel", ["fast", "split"])
def test_pv_sums_chunks_of_fused_products_in_order(kernel):
    """With q = 0 every probability is exactly 1/n (rounded to float16 or not), so each output element is the
    p.v sum alone: bit for bit the numpy replay of the chunked, fused order, for tokens of one tile whose key
    counts end inside, at and past chunk boundaries (and not the sequential order it replaced)."""
    from kernels.attention_fast import PV_CHUNK_KEYS, paged_attention_fast
    from kernels.attention_split import paged_attention_split_g4
    C = PV_CHUNK_KEYS
    positions = [2 * C + 40, C - 1, C, 3]
    q, k, v, pos, seq, tables, bs = _case(128, 2, positions, [0, 0, 0, 0])
    q[:] = 0.0
    for round_probs in (True, False):
        rp = np.array([round_probs])
        out = np.full_like(q, np.nan)
        e32 = np.zeros((2, 0, 128), np.float32)
        fn = paged_attention_fast if kernel == "fast" else paged_attention_split_g4
        fn(q, naive.heads_first(k.view(np.uint16)), naive.heads_first(v.view(np.uint16)), e32, e32, False, pos, seq,
           tables, bs, rp, np.float32(0.125), np.zeros(1, np.float32), out)
        for t, n in enumerate(pos + 1):
            p = np.float32(1.0 / np.float64(n))
            p = np.float32(np.float16(p)) if round_probs else p
            vs = v[tables[0, np.arange(n) // bs] * bs + np.arange(n) % bs].astype(np.float32)  # f32[n, KVH, D]
            for h in range(8):
                want = _chunked_pv(np.full(n, p, np.float32), vs[:, h // 4])
                np.testing.assert_array_equal(out[t, h], want)
                if n > C and not round_probs:  # float32 probabilities: products that round
                    sequential = np.zeros(128, np.float32)
                    for j in range(n):
                        sequential = sequential + p * vs[j, h // 4]
                    assert not np.array_equal(want, sequential)


@pytest.mark.parametrize("D", [128, 64, 80])
@pytest.mark.parametrize("positions,seqs", [
    ([4095], [0]),  # one long decode step
    ([300, 511, 0], [0, 1, 2]),  # odd and even key counts, a chunk boundary, a first token
    ([254, 255, 256, 257], [0, 0, 0, 0]),  # consecutive tokens of one sequence across the chunk boundary
])
@pytest.mark.parametrize("round_probs", [True, False])
def test_split_equals_fast_bit_for_bit(D, positions, seqs, round_probs):
    from kernels.attention_fast import paged_attention_fast
    from kernels.attention_split import paged_attention_split_g4
    q, k, v, pos, seq, tables, bs = _case(D, 2, positions, seqs)
    kc, vc = naive.heads_first(k.view(np.uint16)), naive.heads_first(v.view(np.uint16))  # the cache's layout
    rp = np.array([round_probs, not round_probs, round_probs])[:tables.shape[0]]
    scale = np.float32(1 / np.sqrt(D))
    e32 = np.zeros((2, 0, D), np.float32)
    fast, split = np.full_like(q, np.nan), np.full_like(q, np.nan)
    paged_attention_fast(q, kc, vc, e32, e32, False, pos, seq, tables, bs, rp, scale, np.zeros(1, np.float32), fast)
    paged_attention_split_g4(q, kc, vc, e32, e32, False, pos, seq, tables, bs, rp, scale, np.zeros(1, np.float32),
                             split)
    assert np.array_equal(split.view(np.uint32), fast.view(np.uint32))
    for t in range(len(pos)):
        slots = np.array([tables[seq[t], j // bs] * bs + j % bs for j in range(pos[t] + 1)])
        ref = naive.attention(q[t], k[slots].astype(np.float32), v[slots].astype(np.float32), pos[t] + 1, scale,
                              rp[seq[t]])
        np.testing.assert_allclose(split[t], ref, rtol=1e-4, atol=2e-3 if rp[seq[t]] else 2e-5)


@pytest.mark.parametrize("D", [128, 80])
@pytest.mark.parametrize("round_probs", [True, False])
def test_token_tiles_do_not_change_results(D, round_probs):
    """attention_fast's tiles of consecutive tokens of one sequence (a prefill shares each block of keys among
    them): every tile size gives the results of one token per task, bit for bit, for runs of a sequence longer
    and shorter than a tile, a sequence that comes back later in the batch, token ranges that end inside and at
    the edge of a key block, and the dims past a multiple of 16 (D = 80)."""
    from kernels.attention_fast import _token_tiles, paged_attention_tiled
    positions = list(range(120, 135)) + [60, 61, 62] + [135, 136] + [0]
    seqs = [0] * 15 + [1] * 3 + [0] * 2 + [2]
    q, k, v, pos, seq, tables, bs = _case(D, 2, positions, seqs)
    kc, vc = naive.heads_first(k.view(np.uint16)), naive.heads_first(v.view(np.uint16))  # the cache's layout
    assert list(_token_tiles(seq, 4)) == [0, 4, 8, 12, 15, 18, 20, 21]
    rp = np.array([round_probs, not round_probs, round_probs])
    scale = np.float32(1 / np.sqrt(D))
    e32 = np.zeros((2, 0, D), np.float32)
    outs = {}
    for tile in (1, 2, 3, 4, 7):
        outs[tile] = np.full_like(q, np.nan)
        paged_attention_tiled(q, kc, vc, e32, e32, False, pos, seq, tables, bs, rp, scale, outs[tile], tile)
    for tile in (2, 3, 4, 7):
        assert np.array_equal(outs[tile].view(np.uint32), outs[1].view(np.uint32)), tile
    for t in (0, 14, 17, 19, 20):
        slots = np.array([tables[seq[t], j // bs] * bs + j % bs for j in range(pos[t] + 1)])
        ref = naive.attention(q[t], k[slots].astype(np.float32), v[slots].astype(np.float32), pos[t] + 1, scale,
                              rp[seq[t]])
        np.testing.assert_allclose(outs[4][t], ref, rtol=1e-4, atol=2e-3 if rp[seq[t]] else 2e-5)


def test_auto_picks_split_only_for_few_long_tasks(monkeypatch):
    import kernels.attention_split as split_mod
    calls = []
    monkeypatch.setattr(split_mod.numba, "get_num_threads", lambda: 16)
    monkeypatch.setattr(split_mod, "paged_attention_split_g4", lambda *a: calls.append("split"))
    monkeypatch.setattr(split_mod, "paged_attention_fast", lambda *a: calls.append("fast"))
    D, e16 = 64, np.zeros((2, 0, 64), np.uint16)
    k16 = np.zeros((2, 512, D), np.uint16)
    e32, k32 = np.zeros((2, 0, D), np.float32), np.zeros((2, 512, D), np.float32)
    tables = np.arange(32, dtype=np.int32)[None, :]

    def run(T, last_pos, use_f32=False, H=8):
        q = np.zeros((T, H, D), np.float32)
        pos = np.arange(last_pos - T + 1, last_pos + 1, dtype=np.int32)
        args = (e16, e16, k32, k32) if use_f32 else (k16, k16, e32, e32)
        split_mod.paged_attention_auto(q, *args, use_f32, pos, np.zeros(T, np.int32), tables, 16,
                                       np.array([True]), np.float32(0.1), None, q)
        return calls.pop()

    assert run(1, 400) == "split"  # one decode step, long context: 2 (token, KV head) tasks for 16 threads
    assert run(4, 400) == "split"  # 8 tasks: half the threads would idle in attention_fast
    assert run(5, 400) == "fast"
    assert run(1, 100) == "fast"  # short context
    assert run(64, 400) == "fast"  # prefill: (token, KV head) tasks are plenty
    assert run(1, 400, use_f32=True) == "fast"  # float32 cache: attention_fast's generic path
    assert run(1, 400, H=6) == "fast"  # GQA group of 3
    monkeypatch.setattr(split_mod.numba, "get_num_threads", lambda: 2)
    assert run(1, 400) == "fast"  # 2 threads, 2 tasks: none idle
    assert run(1, split_mod.SPLIT_LONG_KEYS - 1) == "split"  # a decode step at a very long context
    assert run(1, split_mod.SPLIT_LONG_KEYS - 2) == "fast"
    assert run(3, split_mod.SPLIT_LONG_KEYS + 8) == "split"  # a decode batch past the threshold: 6 tasks, 2 threads
    assert run(4, split_mod.SPLIT_LONG_KEYS + 8) == "fast"  # 8 tasks: SPLIT_LONG_MAX_TASKS_PER_THREAD each
    monkeypatch.setattr(split_mod.numba, "get_num_threads", lambda: 16)
    assert run(8, split_mod.SPLIT_LONG_KEYS + 8) == "split"  # 16 tasks for 16 threads
    assert run(9, split_mod.SPLIT_LONG_KEYS + 8) == "fast"  # more tokens: prefill-like, attention_fast


def test_bench_attention_script_prints_checked_table(capsys):
    mod = load_script("bench_attention")
    assert mod.main(["--cases", "decode512", "-r", "1", "-t", "1"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| decode512 |")]
    assert len(row) == 1 and row[0].count("x)") == 3  # fast, split, auto with their speed-ups over plain
    assert mod.main(["--cases", "decode512", "-r", "1", "-t", "1", "--layer-caches"]) == 0
    assert "one cache per layer" in capsys.readouterr().out


def test_bench_attention_imports_another_revisions_kernels():
    """--against REV: REV's kernels/ as a second package beside this tree's (imported only; the table itself is
    the same code path as above)."""
    import subprocess
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.fail("the tests run from a git checkout (CI clones the repository)")
    other, slots_first = load_script("bench_attention").kernels_at("HEAD")
    assert sorted(other) == ["auto@HEAD", "fast@HEAD", "split@HEAD"]
    head_source = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:kernels/attention.py"], capture_output=True,
                                 text=True, check=True).stdout
    assert slots_first == ('CACHE_LAYOUT = "heads_first"' not in head_source)  # older revisions: [n_slots, KVH, D]
    import kernels.attention_fast
    copy = sys.modules["kernels_HEAD.attention_fast"]
    assert copy is not kernels.attention_fast and Path(copy.__file__).parent.name == "kernels_HEAD"
    assert other["fast@HEAD"] is copy.paged_attention_fast


def test_model_logits_identical_with_the_split_kernel(tmp_path, monkeypatch):
    """A 2-layer GQA-4 model (dummy `tiny` layout): a decode step at 300 keys gives bit-identical logits whether
    the model picks attention_fast (1 thread) or the split kernel (64 threads)."""
    import kernels.attention_split as split_mod
    from bitnet_py import model as model_mod
    from bitnet_py.dummy import make_dummy
    path = tmp_path / "tiny.gguf"
    make_dummy("tiny", "i2_s", str(path), seed=3, progress=False)
    m = model_mod.Model.load(str(path))
    prompt = np.arange(300, dtype=np.int32) % 2000 + 5
    tables = np.arange(20, dtype=np.int32)[None, :]

    def batch(tokens, start):
        T = len(tokens)
        return model_mod.Batch(tokens=tokens, positions=np.arange(start, start + T, dtype=np.int32),
                               seq_index=np.zeros(T, np.int32), block_tables=tables,
                               logit_rows=np.array([T - 1], np.int32))

    picked = []
    real_choose = split_mod.choose_attention
    monkeypatch.setattr(model_mod, "choose_attention", lambda *a: picked.append(real_choose(*a)) or picked[-1])
    logits = {}
    for threads in (1, 64):  # one KV head: 1 thread -> attention_fast, 64 -> split
        monkeypatch.setattr(model_mod.numba, "get_num_threads", lambda n=threads: n)
        kv = m.new_kv_cache(20, 16)
        m.forward(batch(prompt, 0), kv)
        logits[threads] = m.forward(batch(np.array([7], np.int32), 300), kv)
    assert picked[-1] is split_mod.paged_attention_split_g4 and picked[1] is split_mod.paged_attention_fast
    assert np.array_equal(logits[1], logits[64])
