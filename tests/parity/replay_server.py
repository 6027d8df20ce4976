"""HARNESS TEST STAND-IN, NOT A PEER: an HTTP server that replays bitnet.cpp's recorded llama-server answers
(the `server` blocks of the fixtures' ref-*.json: /tokenize ids and /completion greedy text with the old-format
top-5 probabilities) for the 8 fixture prompts. It lets the normal suite run the parity harness (HTTP client,
old-format parsing, label -> id resolution, teacher forcing, tolerances) without a llama-server binary. It knows
nothing else: other prompts get 404, /v1/chat/completions 501.
"""
from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class RecordedServerReplay:
    """`with RecordedServerReplay(ref_json) as url:`; `mutate(prompt, body) -> body` may alter /completion
    answers (to prove the harness catches a wrong peer)."""

    def __init__(self, reference: dict, mutate: Callable[[str, dict], dict] | None = None,
                 mutate_tokenize: Callable[[str, list[int]], list[int]] | None = None):
        self.by_prompt = {r["prompt"]: r for r in reference["results"]}
        self.n_predict = reference["n_predict"]
        self.mutate = mutate
        self.mutate_tokenize = mutate_tokenize
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    return self._send(200, {"status": "ok"})
                return self._send(404, {"error": "not recorded"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                status, out = replay.answer(self.path, body)
                self._send(status, out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/v1/chat/completions":
            return 501, {"error": "the recorded fixtures hold no chat answers"}
        text = body.get("content" if path == "/tokenize" else "prompt")
        rec = self.by_prompt.get(text)
        if rec is None:
            return 404, {"error": f"prompt not recorded: {str(text)[:40]!r}"}
        srv = rec["server"]
        if path == "/tokenize":
            ids = list(srv["tokenize_no_bos"])
            return 200, {"tokens": self.mutate_tokenize(text, ids) if self.mutate_tokenize else ids}
        if path == "/completion":
            if body.get("n_predict") != self.n_predict or body.get("n_probs") != 5 or body.get("temperature") != 0:
                return 400, {"error": "only the recorded request (n_predict 32, n_probs 5, temperature 0)"}
            out = {"content": srv["content"], "stop": True, "stopped_eos": srv["stopped_eos"],
                   "tokens_predicted": srv["tokens_predicted"], "tokens_evaluated": srv["tokens_evaluated"],
                   "completion_probabilities": copy.deepcopy(srv["completion_probabilities"])}
            return 200, self.mutate(text, out) if self.mutate else out
        return 404, {"error": f"no route {path}"}

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
