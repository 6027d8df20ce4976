#!/usr/bin/env python
"""Load a running bitnet-py (or any OpenAI-compatible) server and report throughput and latency.

    python scripts/benchmark_throughput.py --url http://127.0.0.1:8080 --concurrency 8 --duration 60 \
        --prompt-len 64 --max-tokens 64 --stream

N workers send /v1/completions back to back for --duration seconds (requests still running at the end are
awaited and counted). Reports requests/s, output tok/s (aggregate), TTFT p50/p95, inter-token latency
p50/p95 (streaming only), end-to-end latency, errors. `--json` prints one JSON object instead of text.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains and "
         "old stories of distant cities").split()


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_prompt(n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n_tokens)))


async def fit_prompt(client: httpx.AsyncClient, n_tokens: int, seed: int) -> str:
    """A prompt of about n_tokens tokens (checked with /tokenize when the server has it)."""
    words = n_tokens
    prompt = make_prompt(words, seed)
    for _ in range(6):
        try:
            r = await client.post("/tokenize", json={"content": prompt})
            have = len(r.json()["tokens"]) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            have = None
        if have is None or abs(have - n_tokens) <= max(1, n_tokens // 50):
            break
        words = max(1, round(words * n_tokens / max(1, have)))
        prompt = make_prompt(words, seed)
    return prompt


class Stats:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.output_tokens = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.e2e: list[float] = []

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one_request(client: httpx.AsyncClient, args, prompt: str, stats: Stats) -> None:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "stream": args.stream, "ignore_eos": not args.allow_eos}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    try:
        if not args.stream:
            r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                stats.error(f"http_{r.status_code}")
                return
            done = time.perf_counter()
            stats.output_tokens += r.json()["usage"]["completion_tokens"]
            stats.ttft.append(done - t0)      # no streaming: first token arrives with the last
            stats.e2e.append(done - t0)
            stats.ok += 1
            return
        first = last = None
        tokens = 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                stats.error(f"http_{r.status_code}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stats.error("stream_error")
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        stats.ttft.append(now - t0)
                    elif last is not None:
                        stats.itl.append(now - last)
                    last = now
        stats.output_tokens += tokens
        stats.e2e.append(time.perf_counter() - t0)
        stats.ok += 1
    except httpx.HTTPError as exc:
        stats.error(type(exc).__name__)


async def worker(client, args, prompt: str, deadline: float, stats: Stats) -> None:
    while time.perf_counter() < deadline:
        await one_request(client, args, prompt, stats)


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        prompts = [await fit_prompt(client, args.prompt_len, seed=i) for i in range(args.concurrency)]
        if args.warmup:
            await one_request(client, args, prompts[0], Stats())
        stats = Stats()
        start = time.perf_counter()
        deadline = start + args.duration
        await asyncio.gather(*(worker(client, args, prompts[i], deadline, stats) for i in range(args.concurrency)))
        elapsed = time.perf_counter() - start

    def ms(v):
        return None if v is None else round(v * 1000, 1)

    return {
        "url": args.url, "concurrency": args.concurrency, "duration_s": round(elapsed, 2), "stream": args.stream,
        "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "requests": stats.ok, "errors": sum(stats.errors.values()), "errors_by_kind": stats.errors,
        "requests_per_s": round(stats.ok / elapsed, 3), "output_tokens": stats.output_tokens,
        "output_tok_per_s": round(stats.output_tokens / elapsed, 2),
        "ttft_ms_p50": ms(percentile(stats.ttft, 50)), "ttft_ms_p95": ms(percentile(stats.ttft, 95)),
        "itl_ms_p50": ms(percentile(stats.itl, 50)), "itl_ms_p95": ms(percentile(stats.itl, 95)),
        "e2e_ms_p50": ms(percentile(stats.e2e, 50)), "e2e_ms_p95": ms(percentile(stats.e2e, 95)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (approximate)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="stream (needed for TTFT / inter-token latency)")
    p.add_argument("--allow-eos", action="store_true", help="let answers end at EOS (default: fixed length)")
    p.add_argument("--model", default="bitnet")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.max_tokens < 1:
        p.error("--concurrency, --duration and --max-tokens must be positive")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"concurrency {result['concurrency']}, {result['duration_s']} s, stream={result['stream']}")
        print(f"  requests: {result['requests']} ok, {result['errors']} errors {result['errors_by_kind'] or ''}")
        print(f"  requests/s: {result['requests_per_s']}   output tok/s: {result['output_tok_per_s']}")
        print(f"  TTFT ms p50/p95: {result['ttft_ms_p50']} / {result['ttft_ms_p95']}")
        print(f"  inter-token ms p50/p95: {result['itl_ms_p50']} / {result['itl_ms_p95']}")
        print(f"  end-to-end ms p50/p95: {result['e2e_ms_p50']} / {result['e2e_ms_p95']}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
