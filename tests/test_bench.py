"""`python -m bitnet_py.bench`: runs end to end on the tiny fixture models; output structure and the derived
numbers (bytes per token, roofline, RSS ratio) are consistent. No timing assertions."""
import json
import subprocess
import sys

import numpy as np
import pytest

from bitnet_py import bench
from bitnet_py.huge_pages import huge_pages_mode
from bitnet_py.model import Model
from bitnet_py.promotion import promotion_possible
from conftest import REPO, fixture_path, load_script

TINY = "tiny-bitnet", "ggml-model-i2_s.gguf"


def test_bench_json_structure(capsys):
    path = str(fixture_path(*TINY))
    assert bench.main(["-m", path, "-p", "8,5", "-n", "3", "-t", "1", "-r", "2", "--no-jit", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [(r["test"], r["threads"]) for r in res["results"]] == [("pp8", 1), ("pp5", 1), ("tg3", 1)]
    for r in res["results"]:
        assert len(r["tok_s"]["runs"]) == 2 and all(v > 0 for v in r["tok_s"]["runs"])
        assert r["tok_s"]["median"] == float(np.median(r["tok_s"]["runs"]))
    m = Model.load(path)
    layers = sum(w.packed.nbytes for L in m.weights.layers for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up,
                                                                     L.w_down))
    db = res["decode_bytes"]
    assert db["layers"] == layers and db["head"] == 2048 * 256 * 2 and db["total"] >= layers + db["head"]
    tg = res["results"][-1]
    bw = res["bandwidth_gb_s"]["1"]
    assert bw > 0 and tg["roofline_tok_s"] == pytest.approx(bw * 1e9 / db["total"])
    assert res["rss_ratio"] == pytest.approx(res["peak_rss_bytes"] / (res["file_bytes"] + res["kv_bytes"]))
    assert res["type"] == "I2_S" and res["threading_layer"] in ("omp", "tbb", "workqueue")
    assert "vs_bitnet_cpp" not in tg  # not the 2B-4T layout
    assert res["weights_memory"] == {"kind": "mmap", "huge_page_bytes": 0}
    assert res["huge_pages_mode"] == huge_pages_mode() and res["huge_pages_mode"] in ("always", "madvise", "never", "")


def test_bench_greedy_logits_read_the_screened_head(capsys, monkeypatch):
    from bitnet_py import screened_head
    calls = []
    real = screened_head.screened_logits
    monkeypatch.setattr(screened_head, "screened_logits", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr("bitnet_py.model.screened_logits", screened_head.screened_logits)
    path = str(fixture_path(*TINY))
    assert bench.main(["-m", path, "-p", "4", "-n", "3", "-t", "1", "-r", "2", "--no-jit", "--json",
                       "--logits", "greedy"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["logits"] == "greedy" and len(calls) == 1 + 2 + 3 + 2 * 3  # warm-ups and runs of pp4 and tg3
    assert all(len(c) == 1 and c[0].k == 1 for c in calls)
    db = res["decode_bytes"]
    assert db["head"] == 2048 * 256 + 4 * 4 * 2048 and db["head_type"] == "I8 screen of F16"
    assert bench.main(["-m", path, "-p", "0", "-n", "1", "-t", "1", "-r", "1", "--no-jit"]) == 0
    assert "logits: all n_vocab per step" in capsys.readouterr().out and len(calls) == 12
    with pytest.raises(SystemExit, match="needs an F16 output head"):  # the f32 file's head has no int8 copy
        bench.main(["-m", str(fixture_path("tiny-bitnet", "ggml-model-f32.gguf")), "-n", "1", "--no-jit",
                    "--logits", "greedy"])


@pytest.mark.skipif(not promotion_possible(), reason="needs Linux with transparent huge pages offered")
def test_bench_times_the_promoted_weights_and_reports_the_promotion(capsys):
    path = str(fixture_path("tiny-llama", "ggml-model-f32.gguf"))  # 9 MB: whole huge pages to promote
    assert bench.main(["-m", path, "-p", "4", "-n", "1", "-t", "1", "-r", "1", "--no-jit", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["weights_memory"]
    # promote_s is set when the copy ends: the timed runs came after it
    assert memory["kind"] == "promoted" and memory["promoted_bytes"] >= 2 * 2 ** 21 and memory["promote_s"] > 0
    assert 0 <= memory["huge_page_bytes"] <= memory["promoted_bytes"]
    assert bench.main(["-m", path, "-p", "4", "-n", "1", "-t", "1", "-r", "1", "--no-jit"]) == 0
    assert "promoted to huge pages in " in capsys.readouterr().out
    assert bench.main(["-m", path, "-p", "0", "-n", "1", "-t", "1", "-r", "1", "--no-jit", "--json",
                       "--keep-file-map"]) == 0
    assert json.loads(capsys.readouterr().out)["weights_memory"] == {"kind": "mmap", "huge_page_bytes": 0}


def test_bench_no_mmap_reports_the_copy(capsys):
    path = str(fixture_path(*TINY))
    assert bench.main(["-m", path, "-p", "4", "-n", "1", "-t", "1", "-r", "1", "--no-jit", "--json", "--no-mmap"]) == 0
    memory = json.loads(capsys.readouterr().out)["weights_memory"]
    assert memory["kind"] == "anonymous" and 0 <= memory["huge_page_bytes"] <= 2 ** 21 * 2
    assert bench.main(["-m", path, "-p", "4", "-n", "1", "-t", "1", "-r", "1", "--no-jit", "--no-mmap"]) == 0
    assert "--no-mmap: anonymous copy, " in capsys.readouterr().out


def test_bench_markdown_and_kernel_choice(capsys, monkeypatch):
    from kernels import config as kernel_config
    # `--kernel` sets the process-wide choice (a CLI run is one process): restored after this test, so that
    # later tests load models with the default kernels
    monkeypatch.setattr(kernel_config, "TERNARY_KERNEL", kernel_config.TERNARY_KERNEL)
    path = str(fixture_path(*TINY))
    assert bench.main(["-m", path, "-p", "4", "-n", "2", "-t", "1", "-r", "1", "--no-jit", "--kernel", "lut"]) == 0
    out = capsys.readouterr().out
    assert "| pp4 | 1 |" in out and "| tg2 | 1 |" in out and "ternary kernel: lut," in out  # lut: no AMX tiles
    assert "bytes read per decoded token" in out and "peak RSS" in out and "| steal |" in out


def test_bench_says_whether_steps_of_16_tokens_run_on_amx_tiles(capsys):
    from kernels.amx import HAVE_AMX
    from kernels.simd import HAVE_AVX2
    path = str(fixture_path(*TINY))
    assert bench.main(["-m", path, "-p", "16", "-n", "1", "-t", "1", "-r", "1", "--no-jit", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["amx"] is (HAVE_AMX and HAVE_AVX2)
    from bitnet_py.bench_report import AMX_NOTE, markdown
    assert (AMX_NOTE in markdown(data)) is data["amx"]


def test_bench_bad_input(capsys, tmp_path):
    assert bench.main(["-m", str(tmp_path / "missing.gguf")]) == 1
    assert "no such model file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["-m", "x", "-p", "1,a"])


def test_bench_cli_with_jit_probe():
    """Through `python -m bitnet_py bench`, including the cold/cached start-up probes in child processes."""
    path = str(fixture_path(*TINY))
    r = subprocess.run([sys.executable, "-m", "bitnet_py", "bench", "-m", path, "-p", "4", "-n", "2", "-t", "1",
                        "-r", "1", "--json"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    jit = json.loads(r.stdout)["jit"]
    for phase in ("cold", "cached"):
        assert set(jit[phase]) >= {"import_s", "load_s", "warmup_s", "ready_s", "process_s", "jit_s", "compute_s"}
        assert jit[phase]["ready_s"] >= jit[phase]["warmup_s"] > 0


def test_steal_share_from_cpu_times():
    # (steal, total) jiffies: 30 of 200 jiffies went to other guests
    assert bench.steal_pct((10, 1000), (40, 1200)) == pytest.approx(15.0)
    assert bench.steal_pct(None, (1, 2)) is None and bench.steal_pct((5, 100), (5, 100)) is None
    now = bench.cpu_times()
    assert now is None or (0 <= now[0] <= now[1])


def test_bench_depth_runs_tests_after_a_filled_context(capsys, monkeypatch):
    import bitnet_py.model as model_mod
    starts = []
    real_forward = model_mod.Model.forward

    def recording_forward(self, batch, kv, heads=None):
        starts.append((int(batch.positions[0]), len(batch.positions)))
        return real_forward(self, batch, kv, heads)
    monkeypatch.setattr(model_mod.Model, "forward", recording_forward)
    path = str(fixture_path(*TINY))
    assert bench.main(["-m", path, "-p", "4", "-n", "3", "-d", "0,20", "-t", "1", "-r", "2", "--no-jit",
                       "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    names = [r["test"] for r in res["results"]]
    assert names == ["pp4", "tg3", "pp4 @ d20", "tg3 @ d20"]
    assert [r["depth"] for r in res["results"]] == [0, 0, 20, 20]
    assert (0, 20) in starts  # the untimed fill of the context (one chunk here)
    i_fill = starts.index((0, 20))
    after = starts[i_fill + 1:]
    assert after and all(pos >= 20 for pos, _ in after)  # every test forward runs on top of it
    assert {pos for pos, n in after if n == 4} == {20} and {pos for pos, n in after if n == 1} >= {20, 21, 22}
    tg0, tg20 = res["results"][1], res["results"][3]
    db0, db20 = bench.decode_bytes(Model.load(path), 1), bench.decode_bytes(Model.load(path), 21)
    bw = res["bandwidth_gb_s"]["1"]
    assert tg0["roofline_tok_s"] == pytest.approx(bw * 1e9 / db0["total"])
    assert tg20["roofline_tok_s"] == pytest.approx(bw * 1e9 / db20["total"])  # the cache it reads counts
    assert res["kv_bytes"] >= Model.load(path).new_kv_cache(2, 16).nbytes  # room for 20 + 4 tokens


def test_bench_depth_beyond_the_context_is_refused(capsys):
    path = str(fixture_path(*TINY))
    with pytest.raises(SystemExit, match="exceeds the model's context"):
        bench.main(["-m", path, "-p", "4", "-n", "0", "-d", "5000", "-t", "1", "-r", "1", "--no-jit"])


@pytest.mark.parametrize("logits", ["all", "greedy"])
def test_bench_depth_fill_goes_in_chunks(capsys, monkeypatch, logits):
    """The fill runs in chunks, with the tests' head: a greedy run's fill must not read the whole f16 head (that
    would promote it beside the screen and inflate the run's peak RSS)."""
    import bitnet_py.model as model_mod
    starts = []
    real_forward = model_mod.Model.forward
    monkeypatch.setattr(bench, "DEPTH_FILL_CHUNK", 8)
    monkeypatch.setattr(model_mod.Model, "forward",
                        lambda self, b, kv, heads=None: starts.append((int(b.positions[0]), len(b.positions), heads))
                        or real_forward(self, b, kv, heads))
    assert bench.main(["-m", str(fixture_path(*TINY)), "-p", "0", "-n", "1", "-d", "20", "-t", "1", "-r", "1",
                       "--no-jit", "--json", "--logits", logits]) == 0
    assert [s[:2] for s in starts[:3]] == [(0, 8), (8, 8), (16, 4)]
    for _, _, heads in starts[:3]:
        assert heads is None if logits == "all" else [h.k for h in heads] == [1]


def test_bench_says_where_tl2_weights_came_from(capsys):
    path = str(fixture_path("tiny-bitnet", "ggml-model-tl2.gguf"))
    assert bench.main(["-m", path, "--tl2-config", str(fixture_path("tl2-kernel_config.ini")), "-p", "4", "-n", "1",
                       "-t", "1", "-r", "1", "--no-jit"]) == 0
    assert "(TL2 weights: decoded)" in capsys.readouterr().out  # the tests run with the repack cache off
    assert bench.main(["-m", str(fixture_path(*TINY)), "-p", "4", "-n", "1", "-t", "1", "-r", "1", "--no-jit",
                       "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tl2_source"] == ""


@pytest.mark.parametrize("n_words,n_threads", [(10, 1), (5000, 2), (200_000, 2), (200_000, 16), (1_000_003, 3)])
def test_read_sum_reads_every_word_in_enough_tasks(n_words, n_threads):
    """The bandwidth probe's kernel against numpy: each task's wrapping sum, every word read once; a matrix
    gets about 4 tasks per thread (32 KiB at least), so that all threads read on many-core hosts."""
    from kernels.membw import MIN_CHUNK, chunk_words, read_sum
    words = np.random.default_rng(n_words).integers(0, 2**63, n_words, dtype=np.uint64)
    chunk = chunk_words(n_words, n_threads)
    n_tasks = -(-n_words // chunk)
    assert chunk >= MIN_CHUNK and (n_tasks >= 4 * n_threads or chunk == MIN_CHUNK)
    partial = np.zeros(n_tasks, np.uint64)
    assert read_sum(words, chunk, partial) == 8 * n_words
    expected = [words[i:i + chunk].sum(dtype=np.uint64) for i in range(0, n_words, chunk)]
    assert np.array_equal(partial, np.array(expected, np.uint64))


def test_bench_ab_imports_another_revision_beside_this_tree():
    """scripts/bench_ab.py --against REV: REV's bitnet_py and kernels become bitnet_py_<rev> / kernels_<rev>, their
    imports of each other rewritten, so the copy runs its own kernels, not this tree's."""
    import bitnet_py.model
    theirs = load_script("bench_ab").engine_at("HEAD")
    assert theirs.__name__ == "bitnet_py_HEAD.model" and theirs.Model is not bitnet_py.model.Model
    assert theirs.weight_kernels.__module__ == "kernels_HEAD.select"
    assert theirs.f16_matmul.py_func.__module__ == "kernels_HEAD.dense"
    assert theirs.kernel_config.__name__ == "kernels_HEAD.config"  # `from kernels import config` rewritten too


def test_bench_ab_rounds_and_ratios(monkeypatch, capsys):
    """The A/B loop on the tiny model, with this tree standing in for the other revision (no second JIT): logits
    identical, every round timed for both engines, ratios per round."""
    import bitnet_py.model
    mod = load_script("bench_ab")
    monkeypatch.setattr(mod, "engine_at", lambda rev: bitnet_py.model)
    path = str(fixture_path(*TINY))
    res = mod.run(path, "HEAD", threads=1, rounds=3, n_decode=2, n_prefill=5, depth=7)
    assert res["identical_logits"] is True
    loads, load = [], Model.load
    monkeypatch.setattr(Model, "load", lambda p, **kw: loads.append(kw) or load(p, **kw))
    assert mod.run(path, "HEAD", threads=1, rounds=1, n_decode=1, n_prefill=0, depth=0,
                   no_mmap=True)["identical_logits"] is True
    assert loads == [{"no_mmap": True, "promote": True}, {}]  # this tree's copy, the other revision's map
    loads.clear()
    assert mod.run(path, "HEAD", threads=1, rounds=1, n_decode=1, n_prefill=0, depth=0,
                   keep_file_map=True)["identical_logits"] is True
    assert loads == [{"no_mmap": False, "promote": False}, {}]
    forward, heads = Model.forward, []
    monkeypatch.setattr(Model, "forward", lambda self, b, kv, *h: heads.append(h) or forward(self, b, kv, *h))
    assert mod.run(path, "HEAD", threads=1, rounds=1, n_decode=1, n_prefill=2, depth=0,
                   top_k=3)["identical_logits"] is True  # the screened head's logits against the full head's
    # per engine a compared prefill and decode step, then the round's: only this tree's steps ask for the top 3
    assert [len(h) and h[0][0].k for h in heads] == [3, 3, 0, 0, 3, 3, 0, 0]
    heads.clear()
    assert mod.run(path, "HEAD", threads=1, rounds=1, n_decode=1, n_prefill=0, depth=0, top_k=2,
                   same_top_k=True)["identical_logits"] is True
    assert [len(h) and h[0][0].k for h in heads] == [2] * 6  # both engines' steps
    heads.clear()
    batched = mod.run(path, "HEAD", threads=1, rounds=1, n_decode=2, n_prefill=0, depth=3, top_k=2, batch=3)
    assert batched["identical_logits"] is True and [t["test"] for t in batched["tests"]] == ["tg2 x 3 sequences"]
    # per engine: each sequence's context (no head request) and prefill token, one compared batched step; then
    # each round's steps of all three sequences (this tree asks for the top 2 of every row)
    assert [len(h) and len(h[0]) for h in heads] == [0, 1, 0, 1, 0, 1, 3] + [0] * 7 + [3, 3, 0, 0]
    assert [t["test"] for t in res["tests"]] == ["pp5", "tg2"]
    for t in res["tests"]:
        assert t["rounds"] == 3 and 0 <= t["ahead"] <= 3 and t["ours"] > 0 and t["theirs"] > 0 and t["ratio"] > 0
    assert mod.main(["-m", path, "--against", "HEAD", "-t", "1", "--rounds", "1", "-n", "1", "-p", "0"]) == 0
    out = capsys.readouterr().out
    assert "| tg1 |" in out and "| pp" not in out and "logits identical to HEAD: True" in out
    with pytest.raises(SystemExit):
        mod.main(["-m", path, "--against", "HEAD", "-n", "0", "-p", "0"])
