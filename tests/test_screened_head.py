"""The screened head (kernels/head_screen.py, bitnet_py/screened_head.py): exact top-k logits from an int8 copy.

Every test compares with the full f16 head (kernels.dense.f16_matmul, the path the bitnet.cpp parity tests
check) or with a float64 / integer numpy reference of the kernel's own arithmetic.
"""
from pathlib import Path

import numpy as np
import pytest

from bitnet_py.sampling import SamplingParams, TopRequest, head_request, make_rng, sample_token
from bitnet_py.screened_head import quantize_head, screened_logits
from kernels.dense import f16_matmul
from kernels.head_select import select_rows
from kernels.head_screen import (ACT_MAX, E_MAX, OUTLIER, ROW_E_NORM, ROW_Q_NORM, ROW_SCALE, ROW_W_TERM,
                                 activation_max, quantize_activation_i16, screen_bounds, screen_bounds_plain)

RNG = np.random.default_rng(7)


def _quantize(y):
    T, K = y.shape
    p, act = np.empty((T, K), np.int16), np.empty((T, 5))
    quantize_activation_i16(y, activation_max(K), p, act)
    return p, act


def _bounds(head, y):
    lower, upper = np.empty((len(y), head.q.shape[0]), np.float32), np.empty((len(y), head.q.shape[0]), np.float32)
    screen_bounds(head.q, head.rows, *_quantize(y), lower, upper)
    return lower, upper


def _full(w16, y):
    out = np.empty((len(y), w16.shape[0]), np.float32)
    f16_matmul(w16.view(np.uint16), np.ascontiguousarray(y, np.float32), out)
    return out


def _f16_values(shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)


def test_activation_codes_match_reference():
    y = _f16_values((3, 200))
    y[1] *= 1e-3
    y[1, 17] = 40.0  # one outlier: the grid is set by it
    y[2] = 0.0
    p, act = _quantize(y)
    y64 = y.astype(np.float64)
    amax = np.abs(y64).max(1)
    ref_sc = np.where(amax > 0, amax / ACT_MAX, 1.0)
    assert np.array_equal(act[:, 0], ref_sc)
    ref_p = np.rint(y64 / ref_sc[:, None])
    assert np.array_equal(p, ref_p) and np.abs(p).max() == ACT_MAX
    big = np.abs(y64) > OUTLIER * np.sqrt((y64 ** 2).mean(1, keepdims=True))
    assert big[1, 17] and big.sum() == 1  # only the outlier is bounded term by term
    refs = [np.linalg.norm(y64, axis=1), np.linalg.norm(y64 - ref_sc[:, None] * ref_p, axis=1),
            np.linalg.norm(np.where(big, 0, y64), axis=1), np.abs(np.where(big, y64, 0)).sum(1)]
    for got, ref in zip(act[:, 1:].T, refs):
        assert (got >= ref).all() and (got <= ref * (1 + 1e-8) + refs[0] * 2.0 ** -39).all()


def test_activation_codes_keep_int32_sums_exact():
    assert activation_max(2560) == (2 ** 31 - 1) // (127 * 2560) < ACT_MAX
    assert activation_max(512) == ACT_MAX
    assert 127 * activation_max(7000) * 7000 < 2 ** 31


@pytest.mark.parametrize("K,T,M", [(256, 1, 70), (40, 1, 70), (300, 2, 70), (2560 + 40, 3, 70), (20, 2, 70),
                                   (16384, 2, 70), (2560, 4, 70), (16384, 4, 70), (300, 7, 71), (2560 + 40, 9, 129),
                                   (20, 5, 3)])
def test_bounds_are_the_exact_integer_dot_and_float64_formula(K, T, M):
    """lower/upper equal a numpy float64 replay of the kernel's formula on the exact integer dots: one token (both
    kernels: screen_bounds_one where K % 32 == 0), pairs, groups of 4 tokens with the pair and the single token
    after them, partial tasks (64 rows), K % 32 tails."""
    w = _f16_values((M, K), 0.05).astype(np.float16)
    w[0] = 0
    w[1, :] = np.float16(-0.05)  # codes -127 on every lane
    head = quantize_head(w.view(np.uint16))
    y = _f16_values((T, K))
    y[0, :] = -y[0, :].max()  # every code at -max: the largest sums, against the int32 limit at large K
    y[-1, 3] = 60.0  # an outlier
    lower, upper = _bounds(head, y)
    p, act = _quantize(y)
    dot = p.astype(np.int64) @ head.q.astype(np.int64).T  # exact integers [T, M]
    rows = head.rows.astype(np.float64)
    a = dot.astype(np.float64) * rows[ROW_SCALE][None, :] * act[:, 0:1]
    b = (rows[ROW_E_NORM][None, :] * act[:, 3:4] + rows[ROW_SCALE][None, :] * E_MAX * act[:, 4:5]
         + rows[ROW_W_TERM][None, :] * act[:, 1:2] + rows[ROW_Q_NORM][None, :] * act[:, 2:3]
         + np.abs(a) * 2.0 ** -20 + 1e-30)
    lo, hi = a - b, a + b
    assert np.array_equal(lower, (lo - np.abs(lo) * 2.0 ** -22).astype(np.float32))
    assert np.array_equal(upper, (hi + np.abs(hi) * 2.0 ** -22).astype(np.float32))
    plain = np.empty_like(lower), np.empty_like(upper)
    screen_bounds_plain(head.q, head.rows, p, act, *plain)  # the fallback of hosts without AVX2
    assert np.array_equal(plain[0], lower) and np.array_equal(plain[1], upper)


@pytest.mark.parametrize("case", ["gaussian", "outlier activation", "worst-case alignment", "tiny values"])
def test_bounds_hold_the_exact_f16_logits(case):
    M, K, T = 300, 2560, 4
    w = _f16_values((M, K), 0.05)
    y = _f16_values((T, K))
    if case == "outlier activation":
        y[:, 5] = 300.0
    if case == "tiny values":
        w *= 1e-3
        y *= 1e-4
    w16 = w.astype(np.float16)
    head = quantize_head(w16.view(np.uint16))
    if case == "worst-case alignment":  # activations along each row's own rounding error: the Cauchy-Schwarz case
        err = w16.astype(np.float64) - head.q * head.row_scales[:, None].astype(np.float64)
        y = (err[:T] / np.abs(err[:T]).max(1, keepdims=True) * 4).astype(np.float16).astype(np.float32)
        y[:, :3] *= 40  # three outliers, still along the error's signs: the term-by-term part of the bound
    exact = _full(w16, y)
    lower, upper = _bounds(head, y)
    assert (lower <= exact).all() and (exact <= upper).all()
    # random f16 rows are the int8 grid's worst case (max/rms ~ 4): intervals ~0.9 sd of the logits wide here,
    # ~0.1 sd on the trained bundled model
    assert (upper - lower).mean() < exact.std()


def test_inf_rows_are_always_candidates():
    M, K = 50, 64
    w = _f16_values((M, K), 0.05).astype(np.float16)
    w[9, 3] = np.inf
    head = quantize_head(w.view(np.uint16))
    lower, upper = _bounds(head, _f16_values((1, K)))
    assert lower[0, 9] == -np.inf and upper[0, 9] == np.inf
    ids = np.empty(M, np.int64)
    assert 9 in ids[:select_rows(lower[0], upper[0], 1, np.zeros(0, np.int64), ids)]


def _random_head(M=4000, K=256):
    w16 = _f16_values((M, K), 0.05).astype(np.float16)
    w16[100] = w16[200]  # identical rows: exact ties in every logits row
    return w16, quantize_head(w16.view(np.uint16))


@pytest.mark.parametrize("k", [1, 2, 40, 256])
def test_screened_rows_hold_the_exact_top_k_and_keep(k):
    w16, head = _random_head()
    y = _f16_values((5, w16.shape[1]))
    keep = np.array([3, 100, 3999], np.int64)
    requests = [TopRequest(k, keep), None, TopRequest(k), TopRequest(k, keep), TopRequest(k)]
    full = _full(w16, y)
    got = screened_logits(w16.view(np.uint16), head, y, requests)
    assert np.array_equal(got[1], full[1])  # a full row
    for r, req in enumerate(requests):
        if req is None:
            continue
        read = np.isfinite(got[r])
        assert np.array_equal(got[r, read], full[r, read])  # bit for bit where computed
        assert read[req.keep].all()
        others = np.setdiff1d(np.arange(len(full[r])), req.keep)
        kth = np.sort(full[r, others])[::-1][k - 1]
        assert read[others[full[r, others] >= kth]].all()  # the top k of the unchanged ids, ties included
        assert (full[r, ~read] < kth).all()
        assert read.sum() < len(full[r]) // 2  # it did cut


def test_requests_the_screen_cannot_cut_get_full_rows():
    w16, head = _random_head(M=300)
    y = _f16_values((3, w16.shape[1]))
    y[2] = 0  # all logits 0: nothing to screen
    got = screened_logits(w16.view(np.uint16), head, y, [TopRequest(257), TopRequest(299), TopRequest(1)])
    assert np.array_equal(got, _full(w16, y))


SAMPLERS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, logit_bias=((7, 5.0), (8, -np.inf))),
    SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=16),
    SamplingParams(),  # llama-server's defaults: top_k 40, top_p 0.95, min_p 0.05, temperature 0.8
    SamplingParams(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=1.0, top_k=200, top_p=0.9, presence_penalty=1.0, frequency_penalty=0.5,
                   repeat_last_n=-1),
    SamplingParams(temperature=0.7, top_k=40, logit_bias=((1, 100.0),)),
]


@pytest.mark.parametrize("params", SAMPLERS)
def test_sampler_picks_the_same_tokens_from_screened_rows(params):
    w16, head = _random_head()
    n = 40
    y = _f16_values((n, w16.shape[1]), 0.3)
    contexts = [RNG.integers(0, w16.shape[0], 30).astype(np.int32) for _ in range(n)]
    requests = [head_request(params, c) for c in contexts]
    assert all(r is not None for r in requests)
    full = _full(w16, y)
    screened = screened_logits(w16.view(np.uint16), head, y, requests)
    assert not np.isfinite(screened).all()
    for r in range(n):
        a = sample_token(full[r], params, make_rng(r), contexts[r])[0]
        b = sample_token(screened[r], params, make_rng(r), contexts[r])[0]
        assert a == b


def test_head_request_reads_the_whole_row_where_the_sampler_does():
    ctx = np.array([5, 6, 7, 5], np.int32)
    assert head_request(SamplingParams(logprobs=0), ctx) is None
    assert head_request(SamplingParams(temperature=0.0, logprobs=3), ctx) is None
    assert head_request(SamplingParams(top_k=0), ctx) is None
    assert head_request(SamplingParams(temperature=0.0, top_k=0), ctx).k == 1
    r = head_request(SamplingParams(top_k=12, repeat_penalty=1.1, repeat_last_n=2, logit_bias=((9, 1.0),)), ctx)
    assert r.k == 12 and r.keep.tolist() == [5, 7, 9]  # the penalty window (last 2) and the biased id
    assert head_request(SamplingParams(), ctx).keep.size == 0  # penalties off: the history is not read


# --- the model, its cache and the server ---

BUNDLED = str(Path(__file__).resolve().parents[1] / "bitnet_py" / "data" / "bitnet-tiny-trained-i2_s.gguf")


@pytest.fixture(scope="module")
def bundled():
    from bitnet_py.model import Model
    return Model.load(BUNDLED)


def test_greedy_generation_reads_the_screen_and_keeps_every_token(bundled, monkeypatch):
    from bitnet_py import screened_head
    from bitnet_py.generate import generate
    calls = []
    real = screened_head.screen_bounds
    monkeypatch.setattr(screened_head, "screen_bounds", lambda *a: calls.append(1) or real(*a))
    assert bundled.weights.screen is not None
    prompt = bundled.tokenizer.encode("Once upon a time")
    full = generate(bundled, prompt, 40, keep_logits=True)
    assert calls == []  # keep_logits: all logits, the f16 head
    screened = generate(bundled, prompt, 40)
    assert len(calls) == 40 and screened.ids == full.ids


@pytest.mark.parametrize("cache_type", ["f16", "f32"])  # f32: the head's input is not rounded to f16
def test_forward_screened_rows_equal_full_rows_where_computed(cache_type):
    from bitnet_py.model import Batch, Model
    model = Model.load(BUNDLED, cache_type=cache_type)
    T = 6
    batch = Batch(np.array([5, 9, 200, 31, 7, 64], np.int32), np.arange(T, dtype=np.int32), np.zeros(T, np.int32),
                  np.zeros((1, 1), np.int32), np.arange(T, dtype=np.int32))
    full = model.forward(batch, model.new_kv_cache(1, 16))
    heads = [TopRequest(1), None, TopRequest(3, np.array([2, 4])), TopRequest(40), TopRequest(1), TopRequest(7)]
    screened = model.forward(batch, model.new_kv_cache(1, 16), heads)
    read = np.isfinite(screened)
    assert read[1].all() and not read[0].all()
    assert np.array_equal(screened[read], full[read])
    assert (screened.argmax(1) == full.argmax(1)).all()


def test_screened_steps_leave_the_f16_head_out_of_the_resident_set():
    """The exact rows and the token embedding rows are read from the file: a screened step maps none of the f16
    head's pages into this process (read through the map, the kernel's fault-around and large page-cache folios
    kept far more than the rows resident: +250 MiB over 400 greedy steps at 2B-4T)."""
    from bitnet_py.model import Batch, Model
    from test_huge_pages import _rss
    model = Model.load(BUNDLED, promote=False)
    head = model.weights.output.f16_bits
    model.gguf.release(head, read_again=True)  # whatever the load read, but the pages shared with neighbours
    before = _rss(head)
    assert before <= 2 * 4096
    kv = model.new_kv_cache(4, 16)
    rng = np.random.default_rng(3)
    for pos in range(40):
        tokens = rng.integers(0, head.shape[0], 1).astype(np.int32)
        out = model.forward(Batch(tokens, np.array([pos], np.int32), np.zeros(1, np.int32),
                                  np.arange(4, dtype=np.int32)[None], np.array([0], np.int32)), kv, [TopRequest(2)])
        assert np.isfinite(out).sum() >= 2
    assert _rss(head) == before


def test_forward_checks_the_request_count(bundled):
    from bitnet_py.model import Batch
    kv = bundled.new_kv_cache(1, 16)
    batch = Batch(np.array([1, 2], np.int32), np.arange(2, dtype=np.int32), np.zeros(2, np.int32),
                  np.zeros((1, 1), np.int32), np.arange(2, dtype=np.int32))
    with pytest.raises(ValueError, match="2 logit rows"):
        bundled.forward(batch, kv, [TopRequest(1)])


def test_int8_copy_is_cached_with_the_model(tmp_path, monkeypatch):
    import mmap
    import shutil
    from bitnet_py.model import Model
    from test_repack_cache import memory_owner
    model = tmp_path / "m.gguf"
    shutil.copy(BUNDLED, model)
    monkeypatch.setenv("BITNET_PY_REPACK_CACHE", "1")
    monkeypatch.setenv("BITNET_PY_CACHE", str(tmp_path / "cache"))
    from bitnet_py.weights import b3_enabled
    Model.load(str(model), screen_head=False)
    # an I2_S file without a screen: nothing to cache, but its weights in the base-3 layout where the host uses it
    assert (tmp_path / "cache").exists() == b3_enabled()
    first = Model.load(str(model)).weights.screen
    assert len(list((tmp_path / "cache" / "repacked").iterdir())) == 1
    second = Model.load(str(model)).weights.screen
    assert isinstance(memory_owner(second.q), mmap.mmap) and memory_owner(first.q) is not None
    for name in ("q", "rows"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    int8 = Model.load(str(model), head_type="int8").weights.output  # the int8 head is the same cached copy
    assert np.array_equal(int8.i8, first.q) and isinstance(memory_owner(int8.i8), mmap.mmap)


def test_server_results_do_not_depend_on_the_screen():
    """Greedy, sampled (seeded, server defaults and with penalties) and logprobs requests through the engine:
    the same tokens and logprobs with and without the screened head."""
    from bitnet_py.engine import EngineConfig
    from bitnet_py.model import Model
    from live_server import LiveServer
    bodies = [dict(temperature=0), dict(seed=3), dict(seed=4, top_k=5, repeat_penalty=1.5, logit_bias={"50": 3}),
              dict(temperature=0, logprobs=3), dict(seed=5, top_k=0)]
    from concurrent.futures import ThreadPoolExecutor
    outputs = []
    for screen in (True, False):
        srv = LiveServer(lambda: Model.load(BUNDLED, screen_head=screen), EngineConfig(max_num_seqs=8, ctx_size=256))
        try:
            assert (srv.engine.model.weights.screen is not None) == screen

            def complete(body):
                with srv.client() as c:
                    r = c.post("/v1/completions", json={"prompt": "The little dog", "max_tokens": 24, **body})
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                return choice["text"], choice.get("logprobs")
            outputs.append([complete(body) for body in bodies])
            with ThreadPoolExecutor(len(bodies)) as pool:  # one batch: each row with its own head request
                outputs.append(list(pool.map(complete, bodies)))
        finally:
            srv.stop()
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]
    assert outputs[0][3][1]["top_logprobs"]  # logprobs came back (from the full head)
