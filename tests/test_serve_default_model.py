"""`python serve.py` with no --model serves the trained tiny model bundled in the package (issue 7)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from conftest import REPO
from live_server import free_port, wait_healthy


def test_serve_without_model_answers_completions_and_chat():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--port", str(port), "--threads", "1",
                             "--parallel", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout=180)
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"prompt": "The meaning of life is", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] > 0 and body["choices"][0]["text"].strip()
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Tell me a joke."}], "max_tokens": 48,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
        # trained on chats in the 2B-4T template: it ends its turn with <|eot_id|> instead of running on
        assert choice["finish_reason"] == "stop"
        assert "<|eot_id|>" not in choice["message"]["content"]
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert models["object"] == "list" and len(models["data"]) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
