"""Issue 6.1: every kind of bad input gets a 4xx OpenAI-style error naming the field and never reaches the engine
(no sequence submitted, no forward pass), against a live server on 127.0.0.1 with the fake model."""
from __future__ import annotations

import json

import httpx
import pytest

from bitnet_py.engine import EngineConfig
from fake_model import N_VOCAB, FakeModel
from live_server import LiveServer

CTX = 256
LONG_TEXT = "a" * (CTX + 10)                 # > ctx tokens with the fake byte tokenizer
MSG = '"messages": [{"role": "user", "content": "hi"}]'


@pytest.fixture(scope="module")
def server():
    srv = LiveServer(lambda: FakeModel(), EngineConfig(max_num_seqs=4, max_queue=4, ctx_size=CTX))
    yield srv
    srv.stop()


def _untouched(server, fn):
    """Run fn; assert nothing reached the engine meanwhile."""
    before = (server.engine.stats()["submitted"], server.engine.model.forward_calls)
    result = fn()
    assert (server.engine.stats()["submitted"], server.engine.model.forward_calls) == before, "reached the engine"
    return result


def _check_error(r: httpx.Response, status: int, param):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    assert err["code"] == status


CASES = [  # (path, raw body, param the error must name)
    # malformed / not an object
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"", None),
    ("/v1/completions", b'"just a string"', None),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, None),
    ("/v1/completions", b'\xef\xbb\xbf{"prompt": "x"}', None),                   # UTF-8 BOM
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', None),
    ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}', None),
    # missing / wrong types
    ("/v1/completions", b'{"max_tokens": 5}', "prompt"),
    ("/v1/completions", b'{"prompt": 12}', "prompt"),
    ("/v1/completions", b'{"prompt": {"a": 1}}', "prompt"),
    ("/v1/completions", b'{"prompt": []}', "prompt"),
    ("/v1/completions", b'{"prompt": [1.5, 2]}', "prompt"),
    ("/v1/completions", b'{"prompt": [true, 2]}', "prompt"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": true}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "stream"),
    ("/v1/completions", b'{"prompt": "x", "stream_options": [1]}', "stream_options"),
    ("/v1/completions", b'{"prompt": "x", "seed": "abc"}', "seed"),
    ("/v1/completions", b'{"prompt": "x", "stop": 5}', "stop"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["a", 5]}', "stop"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": [1, 2]}', "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": "high"}}', "logit_bias"),
    # ranges
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -3}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000000}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e999}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -0.5}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e999}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', "top_p"),
    ("/v1/completions", b'{"prompt": "x", "top_k": -7}', "top_k"),
    ("/v1/completions", b'{"prompt": "x", "presence_penalty": 9}', "presence_penalty"),
    ("/v1/completions", b'{"prompt": "x", "n": 0}', "n"),
    ("/v1/completions", b'{"prompt": "x", "n": 1000}', "n"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 50}', "logprobs"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 1000}}', "logit_bias"),
    ("/v1/completions", ('{"prompt": "x", "stop": %s}' % json.dumps([f"s{i}" for i in range(1000)])).encode(), "stop"),
    ("/v1/completions", ('{"prompt": "x", "stop": ["%s"]}' % ("z" * 5000)).encode(), "stop"),
    # vocabulary and context
    ("/v1/completions", b'{"prompt": [1, %d]}' % N_VOCAB, "prompt"),
    ("/v1/completions", b'{"prompt": [1, -1]}', "prompt"),
    ("/v1/completions", b'{"prompt": [1, 99999999999999999999999]}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"%d": 1}}' % N_VOCAB, "logit_bias"),
    ("/v1/completions", ('{"prompt": "%s"}' % LONG_TEXT).encode(), "prompt"),
    ("/v1/completions", ('{"prompt": %s}' % json.dumps([5] * (CTX + 1))).encode(), "prompt"),
    # text encoding: invalid UTF-8 bytes and lone surrogates, each named
    ("/v1/completions", b'{"prompt": "ab\xff\xfecd"}', "prompt"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\udfff"]}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "ok \\udc80"}]}', "messages[0].content"),
    # chat shapes
    ("/v1/chat/completions", b'{}', "messages"),
    ("/v1/chat/completions", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", b'{"messages": "hello"}', "messages"),
    ("/v1/chat/completions", b'{"messages": ["hello"]}', "messages[0]"),
    ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "messages[0].content"),
    ("/v1/chat/completions", ('{"messages": [{"role": "user", "content": "%s"}]}' % LONG_TEXT).encode(), "messages"),
    ("/v1/chat/completions", ('{%s, "max_completion_tokens": 0}' % MSG).encode(), "max_completion_tokens"),
    ("/v1/chat/completions", ('{%s, "temperature": -1}' % MSG).encode(), "temperature"),
    ("/v1/chat/completions", ('{%s, "top_logprobs": 3}' % MSG).encode(), "top_logprobs"),
    ("/v1/chat/completions", ('{%s, "logprobs": true, "top_logprobs": 99}' % MSG).encode(), "top_logprobs"),
    ("/v1/chat/completions", ('{%s, "tools": [{"type": "function"}]}' % MSG).encode(), "tools"),
    ("/v1/chat/completions", ('{%s, "response_format": {"type": "json_object"}}' % MSG).encode(), "response_format"),
    ("/v1/chat/completions", ('{%s, "n": 50}' % MSG).encode(), "n"),
    # llama-server native endpoints
    ("/completion", b'{"prompt": "x", "n_predict": -2}', "n_predict"),
    ("/completion", b'{"prompt": "x", "n_probs": 500}', "n_probs"),
    ("/tokenize", b'{"content": 5}', "content"),
    ("/tokenize", b'{"content": "\\ud800"}', "content"),
    ("/detokenize", b'{"tokens": [1, %d]}' % N_VOCAB, "tokens"),
    ("/detokenize", b'{"tokens": "abc"}', "tokens"),
]


@pytest.mark.parametrize("path,body,param", CASES, ids=[f"{i}-{c[0]}-{c[2]}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_named_4xx_and_never_reaches_the_engine(server, path, body, param):
    with server.client() as c:
        r = _untouched(server, lambda: c.post(path, content=body, headers={"content-type": "application/json"}))
    _check_error(r, 400, param)
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_ten_megabyte_bodies_get_413_declared_or_chunked(server):
    big = b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'

    def chunked():
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]
    with server.client() as c:
        _check_error(_untouched(server, lambda: c.post("/v1/completions", content=big)), 413, None)
        _check_error(_untouched(server, lambda: c.post("/v1/chat/completions", content=chunked())), 413, None)
        assert c.get("/health").status_code == 200


def test_valid_request_after_the_garbage_still_works(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "temperature": 0,
                                            "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
