"""Single-sequence generation over Model.forward (the CLI, parity tests and benchmarks use it).

The serving path uses the engine's continuous batching instead; this is the simplest correct loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .model import Batch, Model
from .sampling import TopRequest


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    step_logits: list[np.ndarray] = field(default_factory=list)  # f32[n_vocab] before each generated token
    prompt_ms: float = 0.0
    gen_ms: float = 0.0


class Sequence1:
    """One sequence with its own contiguous KV cache (one block covering the whole context)."""

    def __init__(self, model: Model, n_ctx: int):
        self.model = model
        self.n_ctx = n_ctx
        self.kv = model.new_kv_cache(1, n_ctx)
        self.tables = np.zeros((1, 1), dtype=np.int32)
        self.n_past = 0

    def feed(self, ids: list[int], ubatch: int = 512, head: TopRequest | None = None) -> np.ndarray:
        """Evaluate ids after the current ones, in micro-batches; -> logits of the last token f32[n_vocab]
        (with `head`, only those a sampler reads are exact: Model.forward)."""
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"context full: {self.n_past} + {len(ids)} tokens > n_ctx {self.n_ctx}")
        logits = None
        for start in range(0, len(ids), ubatch):
            chunk = np.asarray(ids[start:start + ubatch], dtype=np.int32)
            n = len(chunk)
            batch = Batch(tokens=chunk,
                          positions=np.arange(self.n_past, self.n_past + n, dtype=np.int32),
                          seq_index=np.zeros(n, dtype=np.int32),
                          block_tables=self.tables,
                          logit_rows=np.array([n - 1], dtype=np.int32))
            logits = self.model.forward(batch, self.kv, None if head is None else [head])[0]
            self.n_past += n
        return logits


def greedy(logits: np.ndarray) -> int:
    """First maximum in id order (bitnet.cpp's greedy rule)."""
    return int(np.argmax(logits))


def generate(model: Model, prompt_ids: list[int], n_predict: int, n_ctx: int | None = None,
             ubatch: int = 512, sampler=None, keep_logits: bool = False,
             stop_ids: frozenset[int] = frozenset()) -> GenerationResult:
    """Prefill the prompt (in micro-batches of `ubatch`), then decode one token per forward.
    `sampler(logits, history) -> id` defaults to greedy, which reads only the top logit (a screened head computes
    no other unless keep_logits)."""
    n_ctx = n_ctx or min(model.max_positions, len(prompt_ids) + n_predict)
    seq = Sequence1(model, n_ctx)
    res = GenerationResult(list(prompt_ids))
    t0 = time.perf_counter()
    head = TopRequest(1) if sampler is None and not keep_logits else None
    logits = seq.feed(list(prompt_ids), ubatch, head)
    res.prompt_ms = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    history = list(prompt_ids)
    for step in range(n_predict):
        if keep_logits:
            res.step_logits.append(logits.copy())
        tok = sampler(logits, history) if sampler else greedy(logits)
        res.ids.append(tok)
        history.append(tok)
        if tok in stop_ids or step == n_predict - 1 or seq.n_past >= n_ctx:
            break
        logits = seq.feed([tok], head=head)
    res.gen_ms = (time.perf_counter() - t1) * 1000
    return res
