"""Engine, scheduler and block manager on the fake model (whose logits depend on the KV cache contents)."""
from __future__ import annotations

import threading
import time

import pytest

from bitnet_py.engine import Engine, EngineConfig, GenerationRequest, InvalidRequest, QueueFull
from bitnet_py.sampling import SamplingParams
from fake_model import FakeModel
from live_server import engine_idle, wait_until

GREEDY = SamplingParams(temperature=0.0)


class Collector:
    def __init__(self, n: int = 1) -> None:
        self.events = []
        self.pending = n
        self.done = threading.Event()

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.pending -= 1
            if self.pending == 0:
                self.done.set()

    def tokens(self, index: int = 0) -> list[int]:
        return [t for e in self.events if e.index == index for t in e.token_ids]

    def text(self, index: int = 0) -> str:
        return "".join(e.text for e in self.events if e.index == index)

    def final(self, index: int = 0):
        return [e for e in self.events if e.index == index and e.finish_reason][-1]


def make_engine(model=None, **cfg) -> Engine:
    engine = Engine(lambda: model or FakeModel(), EngineConfig(**cfg))
    engine.start()
    assert engine.ready_event.wait(10) and engine.state == "ready", engine.load_error
    return engine


@pytest.fixture
def engine_factory():
    made = []

    def factory(model=None, **cfg):
        made.append(make_engine(model, **cfg))
        return made[-1]
    yield factory
    for e in made:
        e.shutdown()


def run(engine: Engine, reqs: list[GenerationRequest], timeout: float = 20.0,
        hold: FakeModel | None = None) -> list[Collector]:
    """Submit reqs and wait for all; `hold`: the engine's model, held at its gate until every request is in (so
    they meet in the engine however slowly this thread runs)."""
    cols = []
    if hold is not None:
        hold.gate.clear()
    for r in reqs:
        c = Collector(r.n)
        engine.submit(r, c)
        cols.append(c)
    if hold is not None:
        hold.gate.set()
    for c in cols:
        assert c.done.wait(timeout), "request did not finish"
    return cols


def prompt(engine: Engine, i: int, length: int) -> list[int]:
    tok = engine.tokenizer
    ids = tok.encode(f"prompt {i}: " + "the cat sat on the mat and " * 40)
    return ids[:length]


LENGTHS = [5, 17, 40, 3, 90, 33, 16, 64]


def test_greedy_alone_equals_greedy_in_batch_of_8(engine_factory):
    model = FakeModel(delay_s=0.002)
    engine = engine_factory(model, max_num_seqs=8, prefill_chunk=32, block_size=8, enable_prefix_cache=False)
    reqs = [GenerationRequest(prompt(engine, i, n), GREEDY, max_tokens=24, ignore_eos=True)
            for i, n in enumerate(LENGTHS)]
    alone = [run(engine, [r])[0].tokens() for r in reqs]
    model.batch_sizes.clear()
    together = [c.tokens() for c in run(engine, reqs, hold=model)]   # all 8 submitted before the first step
    assert together == alone
    assert all(len(t) == 24 for t in alone)
    assert max(model.batch_sizes) == 8          # all eight decoded in one forward


def test_chunked_prefill_does_not_stall_running_streams(engine_factory):
    model = FakeModel(delay_s=0.003)
    engine = engine_factory(model, max_num_seqs=4, prefill_chunk=32, block_size=8)
    streaming = Collector()

    def on_event(ev):                     # the stream's first token holds the engine until the long prompt is in
        if not streaming.events:
            model.gate.clear()
        streaming(ev)
    long_prompt = prompt(engine, 1, 250)
    engine.submit(GenerationRequest(prompt(engine, 0, 10), GREEDY, max_tokens=40, ignore_eos=True), on_event)
    while not streaming.events:
        time.sleep(0.001)
    long = Collector()
    engine.submit(GenerationRequest(long_prompt, GREEDY, max_tokens=2, ignore_eos=True), long)
    model.gate.set()
    assert long.done.wait(20)
    assert streaming.done.wait(10)
    assert long.final().finish_reason == "length"
    assert max(model.token_counts) <= 32 + 1        # never more than one chunk plus the decode token
    # while the 250-token prompt was prefilled (8 chunks), the stream kept getting a token every step
    assert sum(1 for n in model.token_counts if n == 33) >= 5


def test_prefix_cache_reuses_blocks_with_identical_output(engine_factory):
    engine = engine_factory(max_num_seqs=2, block_size=8)
    req = GenerationRequest(prompt(engine, 0, 60), GREEDY, max_tokens=10, ignore_eos=True)
    first = run(engine, [req])[0]
    second = run(engine, [GenerationRequest(req.prompt_ids, GREEDY, max_tokens=10, ignore_eos=True)])[0]
    assert first.final().cached_tokens == 0
    assert second.final().cached_tokens == 56     # 7 full blocks of 8 (the last token is always recomputed)
    assert second.tokens() == first.tokens()
    # a different continuation of the shared prefix reuses only the shared blocks
    other = req.prompt_ids[:20] + [5, 6, 7] + req.prompt_ids[23:]
    third = run(engine, [GenerationRequest(other, GREEDY, max_tokens=10, ignore_eos=True)])[0]
    assert third.final().cached_tokens == 16
    fresh = make_engine(None, max_num_seqs=2, block_size=8)
    try:
        assert run(fresh, [GenerationRequest(other, GREEDY, max_tokens=10, ignore_eos=True)])[0].tokens() == \
            third.tokens()
    finally:
        fresh.shutdown()


def test_preemption_under_kv_pressure_keeps_outputs_exact(engine_factory):
    engine = engine_factory(max_num_seqs=4, block_size=4, kv_cache_tokens=80, ctx_size=80, prefill_chunk=64)
    reqs = [GenerationRequest(prompt(engine, i, 20), GREEDY, max_tokens=40, ignore_eos=True) for i in range(4)]
    alone = [run(engine, [r])[0].tokens() for r in reqs]
    together = run(engine, reqs)
    assert engine.stats()["preemptions"] > 0
    assert [c.tokens() for c in together] == alone
    assert engine.stats()["kv_used_blocks"] == 0


def test_cancel_frees_kv_blocks_mid_generation(engine_factory):
    engine = engine_factory(FakeModel(delay_s=0.01), max_num_seqs=2, block_size=4)
    c = Collector()
    rid = engine.submit(GenerationRequest(prompt(engine, 0, 30), GREEDY, max_tokens=400, ignore_eos=True), c)
    while len(c.events) < 3:
        time.sleep(0.005)
    assert engine.stats()["kv_used_blocks"] > 0
    engine.cancel(rid)
    stats = engine_idle(engine)
    assert stats["in_system"] == 0 and stats["running"] == 0 and stats["kv_used_blocks"] == 0
    n = len(c.events)
    time.sleep(0.05)
    assert len(c.events) == n and not c.done.is_set()     # no more events for a cancelled request


def test_cancel_while_waiting_and_queue_bound(engine_factory):
    engine = engine_factory(FakeModel(delay_s=0.01), max_num_seqs=1, max_queue=1)
    busy, queued = Collector(), Collector()
    long = dict(max_tokens=300, ignore_eos=True)
    engine.submit(GenerationRequest(prompt(engine, 0, 10), GREEDY, **long), busy)
    rid = engine.submit(GenerationRequest(prompt(engine, 1, 10), GREEDY, **long), queued)
    with pytest.raises(QueueFull) as err:
        engine.submit(GenerationRequest(prompt(engine, 2, 10), GREEDY, **long), Collector())
    assert err.value.retry_after
    engine.cancel(rid)
    wait_until(lambda: engine.stats()["in_system"] <= 1, what="the cancel never freed its place")
    assert not queued.events
    engine.submit(GenerationRequest(prompt(engine, 2, 10), GREEDY, max_tokens=1), Collector())   # room again


def test_stop_string_cuts_text_and_reports_word(engine_factory):
    engine = engine_factory()
    ids = prompt(engine, 3, 12)
    full = run(engine, [GenerationRequest(ids, GREEDY, max_tokens=30, ignore_eos=True)])[0].text()
    stop = full[10:13]
    assert len(stop) == 3 and full.index(stop) == 10
    cut = run(engine, [GenerationRequest(ids, GREEDY, max_tokens=30, stop=(stop,), ignore_eos=True)])[0]
    assert cut.text() == full[:10]
    final = cut.final()
    assert final.finish_reason == "stop" and final.stop_type == "word" and final.stopping_word == stop


def test_finish_reasons_eos_max_tokens_and_context(engine_factory):
    engine = engine_factory(FakeModel(eos_boost=9.0), ctx_size=40)
    eos = run(engine, [GenerationRequest(prompt(engine, 0, 8), GREEDY, max_tokens=30)])[0].final()
    assert eos.finish_reason == "stop" and eos.stop_type == "eos"
    ctx = run(engine, [GenerationRequest(prompt(engine, 0, 30), GREEDY, ignore_eos=True)])[0].final()
    assert ctx.finish_reason == "length" and ctx.prompt_tokens + ctx.completion_tokens == 40
    lim = run(engine, [GenerationRequest(prompt(engine, 0, 8), GREEDY, max_tokens=3, ignore_eos=True)])[0].final()
    assert lim.finish_reason == "length" and lim.completion_tokens == 3


def test_seeded_sampling_independent_of_batch_and_choices_differ(engine_factory):
    engine = engine_factory(max_num_seqs=8)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=99)
    req = GenerationRequest(prompt(engine, 1, 20), p, n=3, max_tokens=20, ignore_eos=True)
    alone = run(engine, [req])[0]
    others = [GenerationRequest(prompt(engine, i, 15), p, max_tokens=20, ignore_eos=True) for i in range(4)]
    mixed = run(engine, others + [GenerationRequest(req.prompt_ids, p, n=3, max_tokens=20, ignore_eos=True)])[-1]
    assert [mixed.tokens(i) for i in range(3)] == [alone.tokens(i) for i in range(3)]
    assert len({tuple(alone.tokens(i)) for i in range(3)}) == 3


def test_invalid_requests_rejected_before_queueing(engine_factory):
    engine = engine_factory(ctx_size=64)
    with pytest.raises(InvalidRequest) as err:
        engine.submit(GenerationRequest(list(range(3, 70)), GREEDY), Collector())
    assert err.value.param == "prompt"
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest([1, 10**6], GREEDY), Collector())
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest([], GREEDY), Collector())
    assert engine.stats()["in_system"] == 0


def _seq(tokens):
    from bitnet_py.sequence import Sequence
    return Sequence("r", 0, tokens, GREEDY, max_tokens=1, stop=(), stop_ids=frozenset(), detokenizer=None,
                    emit=lambda ev: None)


def test_block_manager_shares_refcounts_and_evicts_lru():
    from bitnet_py.block_manager import BlockManager
    bm = BlockManager(n_blocks=6, block_size=4)
    a = _seq(list(range(10)))                  # 3 blocks
    bm.allocate(a)
    a.num_computed = 10
    bm.register_computed(a)                    # blocks 0..1 full -> cached
    b = _seq(list(range(10)))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed == 8
    assert bm.num_free == 6 - 4                # 2 shared + 1 own each
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free == 6 and len(bm.cached) == 2
    c = _seq(list(range(100, 124)))            # needs all 6 blocks: evicts the cached ones
    assert bm.can_allocate(c)
    bm.allocate(c)
    assert bm.num_free == 0 and not bm.cached
    assert not bm.can_allocate(_seq([1, 2, 3]))
