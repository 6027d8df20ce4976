"""Prometheus metrics (names in vLLM's spirit, prefix `bitnet_py:`), one registry per engine.

The engine thread updates them; `/metrics` renders them with prometheus_client (thread safe).
"""
from __future__ import annotations

import logging

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

PREFIX = "bitnet_py:"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                 1.0, 2.5, 5.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        disable_created_metrics()          # no *_created series (as vLLM)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)       # process_resident_memory_bytes, cpu seconds, open fds (soak drift)
        label = ["model_name"]
        self.model_name = model_name
        self.running = Gauge(PREFIX + "num_requests_running", "Sequences in the running batch", label, registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Sequences waiting to be scheduled", label,
                             registry=r)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)", label,
                              registry=r)
        self.kv_blocks = Gauge(PREFIX + "kv_cache_blocks_total", "KV cache blocks in the pool", label, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed (prefilled)", label,
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", label, registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished sequences by finish reason",
                                       label + ["finished_reason"], registry=r)
        self.request_rejected = Counter(PREFIX + "request_rejected", "Requests refused before queueing, by reason",
                                        label + ["reason"], registry=r)
        self.preemptions = Counter(PREFIX + "num_preemptions", "Sequences preempted for lack of KV blocks", label,
                                   registry=r)
        self.prefix_queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      label, registry=r)
        self.prefix_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                   label, registry=r)
        self.steps = Counter(PREFIX + "engine_steps", "Batched forward passes", label, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token", label,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time between generated tokens", label,
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish", label,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to first scheduled", label,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.request_prompt = Histogram(PREFIX + "request_prompt_tokens", "Prompt length per sequence", label,
                                        buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation = Histogram(PREFIX + "request_generation_tokens", "Generated tokens per sequence",
                                            label, buckets=_TOKEN_BUCKETS, registry=r)
        self.step_tokens = Histogram(PREFIX + "iteration_tokens", "Tokens per engine step", label,
                                     buckets=_TOKEN_BUCKETS, registry=r)
        self._prev_prefix = (0, 0)
        self._prev_preemptions = 0
        self._children: dict[tuple, object] = {}

    def _l(self, metric, **extra):
        """The labelled child (cached: prometheus_client's labels() costs microseconds, per token adds up)."""
        key = (id(metric), *extra.values())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(model_name=self.model_name, **extra)
        return child

    # ---- hooks called by the engine thread -------------------------------------------------------------
    def on_step(self, n_tokens: int, n_prompt_tokens: int, n_generated: int) -> None:
        self._l(self.steps).inc()
        self._l(self.step_tokens).observe(n_tokens)
        if n_prompt_tokens:
            self._l(self.prompt_tokens).inc(n_prompt_tokens)
        if n_generated:
            self._l(self.generation_tokens).inc(n_generated)

    def on_state(self, running: int, waiting: int, kv_usage: float, kv_blocks: int, prefix_queries: int,
                 prefix_hits: int, preemptions: int) -> None:
        self._l(self.running).set(running)
        self._l(self.waiting).set(waiting)
        self._l(self.kv_usage).set(kv_usage)
        self._l(self.kv_blocks).set(kv_blocks)
        dq, dh = prefix_queries - self._prev_prefix[0], prefix_hits - self._prev_prefix[1]
        if dq > 0:
            self._l(self.prefix_queries).inc(dq)
        if dh > 0:
            self._l(self.prefix_hits).inc(dh)
        self._prev_prefix = (prefix_queries, prefix_hits)
        if preemptions > self._prev_preemptions:
            self._l(self.preemptions).inc(preemptions - self._prev_preemptions)
            self._prev_preemptions = preemptions

    def on_queued(self, seconds: float) -> None:
        self._l(self.queue_time).observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self._l(self.ttft).observe(seconds)

    def on_token_interval(self, seconds: float) -> None:
        self._l(self.tpot).observe(seconds)

    def on_finish(self, reason: str, e2e_seconds: float, prompt_tokens: int, generated_tokens: int) -> None:
        self._l(self.request_success, finished_reason=reason).inc()
        self._l(self.e2e).observe(e2e_seconds)
        self._l(self.request_prompt).observe(prompt_tokens)
        self._l(self.request_generation).observe(generated_tokens)

    def on_rejected(self, reason: str) -> None:
        self._l(self.request_rejected, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
