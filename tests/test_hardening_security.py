"""Issue 6.6 on a live server: the API key on every route but /health (constant-time compare of digests),
CORS off unless configured, request-size and header limits, no endpoint that reads a path, no key in the logs."""
from __future__ import annotations

import hmac
import logging

import pytest

from bitnet_py.engine import EngineConfig
from bitnet_py.server import ServerSettings
from fake_model import FakeModel
from live_server import LiveServer

KEY = "sk-very-secret-0123456789"
ROUTES = [("GET", "/v1/models"), ("GET", "/models"), ("POST", "/v1/completions"), ("POST", "/completions"),
          ("POST", "/v1/chat/completions"), ("POST", "/chat/completions"), ("POST", "/completion"),
          ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/props"), ("GET", "/slots"), ("GET", "/metrics"),
          ("GET", "/openapi.json"), ("GET", "/nope"), ("PUT", "/v1/completions"), ("OPTIONS", "/v1/completions"),
          ("HEAD", "/v1/models")]


@pytest.fixture(scope="module")
def keyed():
    srv = LiveServer(lambda: FakeModel(), EngineConfig(max_num_seqs=2),
                     ServerSettings(model_alias="m", model_path="/models/tiny.gguf", api_key=KEY))
    yield srv
    srv.stop()


def test_key_required_everywhere_but_health(keyed, monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    with keyed.client() as c:
        assert c.get("/health").status_code == 200
        for method, path in ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY[:-1]}"},
                            {"Authorization": f"Bearer {KEY}x"}, {"X-API-Key": "nope"}, {"Authorization": KEY}):
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                if method != "HEAD":
                    assert r.json()["error"]["type"] == "authentication_error"
            good = c.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
            assert good.status_code != 401, (method, path)
            assert c.request(method, path, headers={"X-API-Key": KEY}).status_code != 401
    # every check went through compare_digest on equal-length digests (no early exit, no length leak)
    assert calls and all(len(a) == len(b) == 32 for a, b in calls)


def test_metrics_slots_props_tokenize_work_with_the_key(keyed):
    with keyed.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert "bitnet_py:num_requests_running" in c.get("/metrics").text
        assert len(c.get("/slots").json()) == 2
        assert c.get("/props").json()["model_alias"] == "m"
        assert c.post("/tokenize", json={"content": "the cat"}).json()["tokens"]


def test_logs_never_contain_the_key(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    with keyed.client() as c:
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                        {"X-API-Key": KEY}):
            c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2}, headers=headers)
            c.post("/v1/completions", content=b"{broken", headers=headers)
            c.get(f"/v1/models?key={KEY}", headers=headers)
            c.post("/v1/completions", json={"prompt": [1, 10**9]}, headers=headers)
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "stream": True},
               headers={"Authorization": f"Bearer {KEY}"})
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]   # not the client's
    assert any(r.name.startswith("bitnet_py") for r in server_side), "nothing logged: the check would be empty"
    assert not any(KEY in r.getMessage() or KEY[:12] in r.getMessage() for r in server_side)


def test_cors_off_by_default(keyed):
    with keyed.client() as c:
        r = c.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        pre = c.options("/v1/completions", headers={"Origin": "https://evil.example",
                                                    "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers and pre.status_code >= 400


def test_cors_only_for_configured_origins():
    srv = LiveServer(lambda: FakeModel(), settings=ServerSettings(model_alias="m", api_key=KEY,
                                                                  cors_origins=("https://app.example",)))
    try:
        with srv.client() as c:
            pre = c.options("/v1/chat/completions", headers={"Origin": "https://app.example",
                                                             "Access-Control-Request-Method": "POST",
                                                             "Access-Control-Request-Headers": "authorization"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "https://app.example"
            r = c.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
            other = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
            assert other.headers.get("access-control-allow-origin") != "https://evil.example"
            r = c.get("/v1/models", headers={"Origin": "https://evil.example"})
            assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
    finally:
        srv.stop()


def test_header_and_body_limits(keyed):
    with keyed.client() as c:
        many = {f"x-h{i}": "v" for i in range(150)}
        r = c.get("/health", headers=many)
        assert r.status_code == 431 and r.json()["error"]["code"] == 431
        r = c.get("/health", headers={"x-big": "a" * 40_000})             # beyond the parser's head limit
        assert 400 <= r.status_code < 500
    with keyed.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        r = c.post("/v1/completions", content=b"x" * (10 * 1024 * 1024))
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../../etc/passwd",
                                  "/v1/models/../../../etc/passwd", "/etc/passwd", "//etc/passwd",
                                  "/file=/etc/passwd", "/v1/files/etc/passwd"])
def test_no_endpoint_serves_paths(keyed, path):
    with keyed.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        r = c.get(path)
    assert r.status_code in (400, 404) and "root:" not in r.text


def test_path_like_fields_are_not_read(keyed):
    with keyed.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        for body in ({"prompt": "x", "max_tokens": 2, "model": "/etc/passwd"},
                     {"prompt": "x", "max_tokens": 2, "grammar_file": "/etc/passwd", "chat_template": "/etc/passwd"},
                     {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "model": "../../etc/passwd",
                      "chat_template_kwargs": {"path": "/etc/passwd"}}):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = c.post(path, json=body)
            assert r.status_code == 200 and "root:" not in r.text and r.json()["model"] == "m"
        assert c.get("/props").json()["model_path"] == "/models/tiny.gguf"        # only the configured name
