"""HTTP client for a llama-server-compatible peer, normalizing the answers of old and new server versions.

`/completion` with `n_probs` answers in one of two shapes:
- old (bitnet.cpp's fork, llama.cpp of autumn 2024): `completion_probabilities: [{content, probs: [{tok_str,
  prob}]}]`, no token ids; at temperature 0 `prob` is a softmax over the top-n_probs logits only (renormalized),
  and a lone byte >= 0x80 is shown as "byte: \\xNN".
- new (upstream since 2025, and our server): `[{id, token, logprob, bytes, top_logprobs: [{id, token, logprob,
  bytes}]}]` with full-vocabulary log-probabilities.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import httpx

PROBS_TOPK = "topk"  # probabilities renormalized over the listed candidates
PROBS_FULL = "full"  # full-vocabulary softmax


@dataclass
class Candidate:
    id: int | None  # None when the server does not say (old format)
    label: str  # the server's text for the token
    prob: float


@dataclass
class PeerStep:
    id: int | None
    label: str
    top: list[Candidate]


@dataclass
class PeerCompletion:
    content: str
    steps: list[PeerStep]
    prob_kind: str  # PROBS_TOPK or PROBS_FULL
    ids: list[int] | None  # generated ids, when the server gives them
    stopped_eos: bool
    n_predicted: int
    n_evaluated: int
    timings: dict = field(default_factory=dict)


@dataclass
class PeerChat:
    content: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None


def parse_probabilities(entries: list[dict]) -> tuple[list[PeerStep], str]:
    """completion_probabilities (either shape) -> steps and the kind of probability they carry."""
    steps: list[PeerStep] = []
    kind = PROBS_FULL
    for e in entries:
        if "probs" in e:  # old shape
            kind = PROBS_TOPK
            top = [Candidate(None, c["tok_str"], float(c["prob"])) for c in e["probs"]]
            steps.append(PeerStep(None, e["content"], top))
        elif "top_logprobs" in e:
            top = [Candidate(c.get("id"), c.get("token", ""), math.exp(c["logprob"])) for c in e["top_logprobs"]]
            steps.append(PeerStep(e.get("id"), e.get("token", ""), top))
        else:
            raise ValueError(f"unknown completion_probabilities entry: {sorted(e)}")
    return steps, kind


class PeerClient:
    """One llama-server-compatible base URL."""

    def __init__(self, url: str, timeout: float = 300.0, api_key: str | None = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not alive():
                raise RuntimeError(f"{self.url}: server exited before /health answered 200")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}/health not 200 after {timeout:.0f} s")
            time.sleep(0.2)

    def _post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"POST {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def props(self) -> dict:
        r = self.http.get("/props")
        return r.json() if r.status_code == 200 else {}

    def tokenize(self, text: str) -> list[int]:
        """Ids without BOS (llama-server's /tokenize default)."""
        toks = self._post("/tokenize", {"content": text})["tokens"]
        return [t["id"] if isinstance(t, dict) else int(t) for t in toks]

    def completion(self, prompt: str, n_predict: int, n_probs: int = 5) -> PeerCompletion:
        """Greedy continuation (temperature 0), as the fixtures' llama-server run asked for it."""
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "top_k": 1, "n_probs": n_probs,
                "cache_prompt": False, "seed": 0, "return_tokens": True, "stream": False}
        out = self._post("/completion", body)
        steps, kind = parse_probabilities(out.get("completion_probabilities") or [])
        ids = out.get("tokens") or None
        if ids is None and steps and all(s.id is not None for s in steps):
            ids = [s.id for s in steps]
        stopped_eos = bool(out.get("stopped_eos", out.get("stop_type") == "eos"))
        return PeerCompletion(content=out.get("content", ""), steps=steps, prob_kind=kind, ids=ids,
                              stopped_eos=stopped_eos, n_predicted=int(out.get("tokens_predicted", len(steps))),
                              n_evaluated=int(out.get("tokens_evaluated", 0)), timings=out.get("timings") or {})

    def chat(self, messages: list[dict], max_tokens: int) -> PeerChat:
        out = self._post("/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens,
                                                  "temperature": 0, "top_k": 1, "seed": 0, "stream": False})
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return PeerChat(choice["message"].get("content") or "", choice.get("finish_reason") or "",
                        usage.get("prompt_tokens"), usage.get("completion_tokens"))
