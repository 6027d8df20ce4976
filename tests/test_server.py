"""HTTP API against a live uvicorn server on 127.0.0.1 with the fake model (official openai client + raw httpx)."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from bitnet_py.engine import EngineConfig
from bitnet_py.server import ServerSettings
from fake_model import FakeModel
from live_server import LiveServer, engine_idle, wait_until

PROMPT = "the cat sat on the mat and"


@pytest.fixture(scope="module")
def server():
    srv = LiveServer(lambda: FakeModel(delay_s=0.002), EngineConfig(max_num_seqs=8, max_queue=16, ctx_size=256))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


# ---- OpenAI client ------------------------------------------------------------------------------------------
def test_completion_shape_and_usage(oai):
    r = oai.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "test-model"
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_text_equals_non_streaming(oai):
    kw = dict(model="x", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = oai.completions.create(prompt=PROMPT, **kw).choices[0].text
    parts = [c.choices[0].text for c in oai.completions.create(prompt=PROMPT, stream=True, **kw) if c.choices]
    assert "".join(parts) == full and len(parts) > 1
    msgs = [{"role": "user", "content": "hello"}]
    chat = oai.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(oai.chat.completions.create(messages=msgs, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_shape(oai):
    r = oai.chat.completions.create(model="x", messages=[{"role": "system", "content": "be brief"},
                                                         {"role": "user", "content": "hi"}], max_tokens=5)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stop_sequences(oai):
    kw = dict(model="x", prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = oai.completions.create(**kw).choices[0].text
    stop = full[8:11]
    first = full.index(stop)
    r = oai.completions.create(stop=[stop, "\u2603never"], **kw)
    assert r.choices[0].text == full[:first] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in oai.completions.create(stop=stop, stream=True, **kw) if c.choices)
    assert streamed == full[:first]


def test_seed_reproducible_and_n_choices(oai):
    kw = dict(model="x", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=1.0, seed=1234,
              extra_body={"ignore_eos": True, "top_k": 0, "min_p": 0.0})
    a = oai.completions.create(n=3, **kw)
    b = oai.completions.create(n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 48


def test_logprobs_completion_and_chat(oai):
    r = oai.completions.create(model="x", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                               extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for i in range(6):
        assert lp.token_logprobs[i] <= 0
        assert len(lp.top_logprobs[i]) <= 3     # pieces can repeat as strings
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i])   # greedy = top-1
    assert lp.text_offset[0] == 0
    c = oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    raw = b"".join(bytes(t.bytes) for t in content)
    assert raw.decode("utf-8", errors="replace") == c.choices[0].message.content


def test_concurrent_requests_match_solo_results(server, oai):
    prompts = [f"{i} the cat" + " sat" * i for i in range(8)]
    kw = dict(model="x", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    solo = [oai.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: oai.completions.create(prompt=p, **kw).choices[0].text, prompts))
    assert together == solo


# ---- raw HTTP ---------------------------------------------------------------------------------------------------
def test_sse_framing_and_usage_chunk(server):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                 "stream": True, "stream_options": {"include_usage": True},
                                                 "ignore_eos": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert all(ch["usage"] is None for ch in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1,2]", 400, None),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    ("/v1/completions", b'{"max_tokens": 5}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": [1, 99999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"99999": 1}}', 400, "logit_bias"),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "n"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    with server.client() as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_stop_list_too_long_and_prompt_too_long(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "x", "stop": [f"s{i}" for i in range(1000)]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
        r = c.post("/v1/completions", json={"prompt": "a" * 400})
        assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_body_too_large_404_405(server):
    with server.client() as c:
        r = c.post("/v1/completions", content=b"{" + b" " * (3 * 1024 * 1024) + b"}")
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert c.get("/v1/completions").status_code == 405


def test_native_endpoints(server):
    with server.client() as c:
        toks = c.post("/tokenize", json={"content": "the cat"}).json()["tokens"]
        assert c.post("/detokenize", json={"tokens": toks}).json()["content"] == "the cat"
        pieces = c.post("/tokenize", json={"content": "the cat", "with_pieces": True}).json()["tokens"]
        assert [p["id"] for p in pieces] == toks
        r = c.post("/completion", json={"prompt": PROMPT, "n_predict": 5, "temperature": 0, "n_probs": 2,
                                        "ignore_eos": True}).json()
        assert r["stop"] is True and r["tokens_predicted"] == 5 and len(r["tokens"]) == 5
        assert r["stop_type"] == "limit" and len(r["completion_probabilities"]) == 5
        stream = sse_events(c.post("/completion", json={"prompt": PROMPT, "n_predict": 5, "temperature": 0,
                                                        "stream": True, "ignore_eos": True}).text)
        parts = [json.loads(e) for e in stream]
        assert parts[-1]["stop"] is True and "".join(p["content"] for p in parts) == r["content"]
        props = c.get("/props").json()
        assert props["total_slots"] == 8 and props["default_generation_settings"]["n_ctx"] == 256
        slots = c.get("/slots").json()
        assert len(slots) == 8 and not any(s["is_processing"] for s in slots)
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "test-model"


def test_metrics_counters_move(server, oai):
    before = server.metric("bitnet_py:generation_tokens_total")
    prompt_before = server.metric("bitnet_py:prompt_tokens_total")
    oai.completions.create(model="x", prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    # counted after the step's tokens went out, so maybe after the reply
    wait_until(lambda: server.metric("bitnet_py:generation_tokens_total") >= before + 7)
    assert server.metric("bitnet_py:generation_tokens_total") == before + 7
    assert server.metric("bitnet_py:prompt_tokens_total") > prompt_before
    assert server.metric("bitnet_py:request_success_total", finished_reason="length") >= 1
    assert server.metric("bitnet_py:time_to_first_token_seconds_count") >= 1


def test_stream_disconnect_frees_sequence():
    server = LiveServer(lambda: FakeModel(delay_s=0.02), EngineConfig(ctx_size=512))
    try:
        with server.client() as c:
            with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 450, "stream": True,
                                                           "ignore_eos": True}) as r:     # >= 9 s: cut, not ended
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
                assert server.engine.stats()["running"] == 1
        stats = engine_idle(server.engine)
        assert stats["in_system"] == 0 and stats["kv_used_blocks"] == 0
        wait_until(lambda: not server.metric("bitnet_py:num_requests_running"))   # set after the step's stats
        assert server.metric("bitnet_py:num_requests_running") == 0
        assert server.metric("bitnet_py:request_success_total", finished_reason="cancelled") == 1
    finally:
        server.stop()


def test_disconnect_during_prefill_frees_sequence():
    srv = LiveServer(lambda: FakeModel(per_token_s=0.02), EngineConfig(prefill_chunk=16, ctx_size=512))
    try:
        body = {"prompt": "word " * 80, "max_tokens": 5}       # 401 tokens: 26 chunks, ~8 s of prefill
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.5)
        seen = srv.engine.stats()
        assert seen["in_system"] <= 1
        stats = engine_idle(srv.engine)
        assert stats["in_system"] == 0 and stats["kv_used_blocks"] == 0
        (_, asked, freed), = stats["cancel_log"]
        assert freed < 26                            # freed mid-prefill, not after it
        assert srv.metric("bitnet_py:generation_tokens_total") == 0
    finally:
        srv.stop()


def test_health_while_loading_then_ok():
    gate = threading.Event()

    def slow_loader():
        gate.wait(30)
        return FakeModel()
    srv = LiveServer(slow_loader, wait_ready=False)
    try:
        with srv.client() as c:
            r = c.get("/health")
            assert r.status_code == 503
            assert r.json() == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
            r = c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and r.headers.get("retry-after")
            gate.set()
            srv.wait_ready()
            r = c.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
    finally:
        gate.set()
        srv.stop()


def test_queue_full_is_503_with_retry_after():
    srv = LiveServer(lambda: FakeModel(delay_s=0.02), EngineConfig(max_num_seqs=1, max_queue=0))
    try:
        body = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}   # 6 s: still running
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                next(r.iter_lines())
                second = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
                assert second.json()["error"]["type"] == "unavailable_error"
        assert srv.metric("bitnet_py:request_rejected_total", reason="queue_full") == 1
    finally:
        srv.stop()


def test_api_key_enforced_on_every_route_but_health():
    srv = LiveServer(lambda: FakeModel(), settings=ServerSettings(model_alias="m", api_key="s3cret"))
    try:
        with srv.client() as c:
            assert c.get("/health").status_code == 200
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                 ("POST", "/completion"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                                 ("GET", "/props"), ("GET", "/slots"), ("GET", "/metrics"), ("GET", "/nope")]:
                r = c.request(method, path, json={})
                assert r.status_code == 401, path
                assert r.json()["error"]["type"] == "authentication_error"
                assert c.request(method, path, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="m", prompt="x", max_tokens=2).choices
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="m", prompt="x", max_tokens=2)
    finally:
        srv.stop()


def test_native_cache_prompt_controls_prefix_reuse(server):
    body = {"prompt": "abcdefghij" * 4, "n_predict": 2, "temperature": 0}       # 41 tokens with BOS
    with server.client() as c:
        c.post("/completion", json=body)
        assert c.post("/completion", json=body).json()["tokens_cached"] == 32
        assert c.post("/completion", json={**body, "cache_prompt": False}).json()["tokens_cached"] == 0


def test_request_timeout_cancels_with_504():
    srv = LiveServer(lambda: FakeModel(delay_s=0.02), settings=ServerSettings(model_alias="m", request_timeout=0.3))
    try:
        with srv.client() as c:
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True})
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
            s = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
                                                "stream": True})
            events = sse_events(s.text)
            assert json.loads(events[-2])["error"]["code"] == 504 and events[-1] == "[DONE]"
        assert engine_idle(srv.engine)["in_system"] == 0
        assert srv.metric("bitnet_py:request_success_total", finished_reason="cancelled") == 2
    finally:
        srv.stop()
