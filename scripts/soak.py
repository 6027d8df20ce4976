"""Soak test: hammer a running server for a long time with a realistic mix and report what went wrong.

    python scripts/soak.py --url http://127.0.0.1:8080 --duration 3600 --concurrency 8 [--api-key K] [--json out.json]

Each worker loops over: streaming and non-streaming completions and chat completions (checked: SSE framing,
[DONE], a finish_reason on the last chunk, usage), cancelled streams (the client hangs up after a few chunks)
and invalid requests (must get a 4xx OpenAI-style error). Every request is classified; server RSS is sampled
from /metrics (process_resident_memory_bytes) or /proc/PID (--pid). The exit status is 1 when any request
failed (5xx, timeout, connection error, malformed answer, unexpected status) or /health is not 200 at the end.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter, defaultdict

import httpx

PROMPTS = ["Once upon a time", "The quick brown fox", "In a small village there lived", "Hello", "1, 2, 3,",
           "The meaning of life is", "Write a story about a cat."]
INVALID = [  # (body bytes, what it exercises)
    (b"{not json", "malformed"),
    (b'{"prompt": "x", "max_tokens": "ten"}', "type"),
    (b'{"prompt": "x", "max_tokens": 0}', "range"),
    (b'{"prompt": "x", "temperature": -1}', "range"),
    (b'{"max_tokens": 3}', "missing"),
    (b'{"prompt": [1, 999999999]}', "vocab"),
    (b'{"prompt": "\\ud800"}', "surrogate"),
    (b'{"prompt": "\xff\xfe"}', "utf8"),
    (b'{"prompt": "x", "stop": ' + json.dumps([str(i) for i in range(1000)]).encode() + b"}", "stop"),
]
INVALID_CHAT = [(b'{"messages": []}', "empty"), (b'{"messages": [{"role": "wizard", "content": "x"}]}', "role")]
KINDS = ("stream", "nonstream", "cancel", "invalid")


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter = Counter()               # (kind, outcome)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.ttft: list[float] = []
        self.tokens = 0
        self.examples: dict[str, str] = {}

    def add(self, kind: str, outcome: str, seconds: float, detail: str = "", ttft: float | None = None,
            tokens: int = 0) -> None:
        with self.lock:
            self.counts[(kind, outcome)] += 1
            if outcome in ("ok", "rejected"):
                self.latency[kind].append(seconds)
            if ttft is not None:
                self.ttft.append(ttft)
            self.tokens += tokens
            if outcome not in ("ok", "rejected") and outcome not in self.examples:
                self.examples[outcome] = f"{kind}: {detail}"[:300]


def _body(rng: random.Random, chat: bool, stream: bool, max_tokens: int) -> dict:
    body = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.7, 1.0]), "stream": stream,
            "seed": rng.randint(0, 1 << 30)}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["stop"] = [rng.choice([".", "\n", " the"])]
    return body


def _classify_status(r: httpx.Response) -> str | None:
    if r.status_code in (429, 503):
        return "rejected" if r.headers.get("retry-after") else "rejected_without_retry_after"
    if r.status_code >= 500:
        return f"http_{r.status_code}"
    if r.status_code != 200:
        return f"unexpected_{r.status_code}"
    return None


def run_stream(client: httpx.Client, rng: random.Random, stats: Stats, max_tokens: int, cancel: bool) -> None:
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = _body(rng, chat, True, max_tokens)
    kind = "cancel" if cancel else "stream"
    t0 = time.perf_counter()
    ttft, events, finish, tokens = None, [], None, 0
    stop_after = rng.randint(1, 4)
    with client.stream("POST", path, json=body) as r:
        bad = _classify_status(r)
        if bad:
            r.read()
            stats.add(kind, bad, time.perf_counter() - t0, r.text)
            return
        for line in r.iter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                stats.add(kind, "bad_sse", time.perf_counter() - t0, line)
                return
            data = line[6:]
            events.append(data)
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                stats.add(kind, f"stream_error_{obj['error'].get('code')}", time.perf_counter() - t0, data)
                return
            for ch in obj.get("choices", []):
                text = ch.get("text") if not chat else (ch.get("delta") or {}).get("content")
                if text and ttft is None:
                    ttft = time.perf_counter() - t0
                if text:
                    tokens += 1
                finish = ch.get("finish_reason") or finish
            if cancel and len(events) >= stop_after:
                break                                         # hang up mid-stream
    seconds = time.perf_counter() - t0
    if cancel:
        stats.add(kind, "ok", seconds, ttft=ttft)
    elif not events or events[-1] != "[DONE]":
        stats.add(kind, "stream_truncated", seconds, f"{len(events)} events")
    elif finish not in ("stop", "length"):
        stats.add(kind, "no_finish_reason", seconds, events[-2] if len(events) > 1 else "")
    else:
        stats.add(kind, "ok", seconds, ttft=ttft, tokens=tokens)


def run_nonstream(client: httpx.Client, rng: random.Random, stats: Stats, max_tokens: int) -> None:
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    r = client.post(path, json=_body(rng, chat, False, max_tokens))
    seconds = time.perf_counter() - t0
    bad = _classify_status(r)
    if bad:
        stats.add("nonstream", bad, seconds, r.text)
        return
    obj = r.json()
    choice = obj["choices"][0]
    if choice.get("finish_reason") not in ("stop", "length") or "usage" not in obj:
        stats.add("nonstream", "malformed", seconds, r.text)
        return
    stats.add("nonstream", "ok", seconds, tokens=obj["usage"]["completion_tokens"])


def run_invalid(client: httpx.Client, rng: random.Random, stats: Stats) -> None:
    chat = rng.random() < 0.2
    body, _what = rng.choice(INVALID_CHAT if chat else INVALID)
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions" if chat else "/v1/completions", content=body,
                    headers={"content-type": "application/json"})
    seconds = time.perf_counter() - t0
    if r.status_code in (429, 503):
        stats.add("invalid", _classify_status(r) or "rejected", seconds, r.text)
    elif 400 <= r.status_code < 500 and set(r.json().get("error", {})) >= {"message", "type", "param", "code"}:
        stats.add("invalid", "ok", seconds)
    else:
        stats.add("invalid", f"invalid_got_{r.status_code}", seconds, r.text)


def worker(args, stats: Stats, deadline: float, seed: int, headers: dict) -> None:
    rng = random.Random(seed)
    weights = [args.mix[k] for k in KINDS]
    with httpx.Client(base_url=args.url, timeout=args.request_timeout, headers=headers) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(KINDS, weights)[0]
            t0 = time.perf_counter()
            try:
                if kind in ("stream", "cancel"):
                    run_stream(client, rng, stats, args.max_tokens, cancel=kind == "cancel")
                elif kind == "nonstream":
                    run_nonstream(client, rng, stats, args.max_tokens)
                else:
                    run_invalid(client, rng, stats)
            except httpx.TimeoutException as exc:
                stats.add(kind, "timeout", time.perf_counter() - t0, repr(exc))
            except httpx.HTTPError as exc:
                stats.add(kind, "connection_error", time.perf_counter() - t0, repr(exc))
                time.sleep(0.5)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                stats.add(kind, "malformed", time.perf_counter() - t0, repr(exc))


def server_rss(url: str, pid: int | None, headers: dict) -> float | None:
    if pid:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return float(line.split()[1]) * 1024
        except OSError:
            return None
    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]       # noqa: E731
    return {"n": len(v), "p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": v[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--duration", type=float, default=3600.0, help="seconds")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None, help="read the server's RSS from /proc/PID (else /metrics)")
    p.add_argument("--max-tokens", type=int, default=48, help="largest max_tokens of the generated requests")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--sample-every", type=float, default=30.0, help="seconds between RSS samples")
    p.add_argument("--mix", default="stream=4,nonstream=3,cancel=2,invalid=1", help="relative weights of the kinds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-' = stdout)")
    args = p.parse_args(argv)
    args.mix = {k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    if set(args.mix) - set(KINDS):
        p.error(f"--mix kinds are {', '.join(KINDS)}")
    args.mix = {k: args.mix.get(k, 0.0) for k in KINDS}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    if httpx.get(args.url + "/health", timeout=10).status_code != 200:
        print("server is not healthy", file=sys.stderr)
        return 2
    stats = Stats()
    rss = [(0.0, server_rss(args.url, args.pid, headers))]
    start = time.monotonic()
    deadline = start + args.duration
    threads = [threading.Thread(target=worker, args=(args, stats, deadline, args.seed * 1000 + i, headers),
                                daemon=True) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(min(args.sample_every, max(0.1, deadline - time.monotonic() + 0.1)))
        rss.append((time.monotonic() - start, server_rss(args.url, args.pid, headers)))
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    time.sleep(1.0)
    rss.append((time.monotonic() - start, server_rss(args.url, args.pid, headers)))
    health = httpx.get(args.url + "/health", timeout=10).status_code

    by_kind: dict = defaultdict(dict)
    errors: Counter = Counter()
    for (kind, outcome), n in stats.counts.items():
        by_kind[kind][outcome] = n
        if outcome not in ("ok", "rejected"):
            errors[outcome] += n
    total = sum(stats.counts.values())
    valid_rss = [(t, v) for t, v in rss if v]
    first = next((v for t, v in valid_rss if t >= min(60.0, args.duration / 10)), valid_rss[0][1] if valid_rss else None)
    report = {
        "url": args.url, "duration_s": round(elapsed, 1), "concurrency": args.concurrency,
        "requests": total, "requests_per_s": round(total / elapsed, 2) if elapsed else 0.0,
        "by_kind": by_kind, "errors": dict(errors), "error_examples": stats.examples,
        "rejected_429_503": sum(n for (k, o), n in stats.counts.items() if o == "rejected"),
        "streamed_chunks_and_tokens": stats.tokens,
        "latency_s": {k: percentiles(v) for k, v in stats.latency.items()}, "ttft_s": percentiles(stats.ttft),
        "rss_bytes": {"start": valid_rss[0][1] if valid_rss else None, "after_warmup": first,
                      "end": valid_rss[-1][1] if valid_rss else None, "max": max((v for _, v in valid_rss), default=None),
                      "samples": [(round(t, 1), v) for t, v in valid_rss]},
        "health_after": health,
    }
    if first and valid_rss:
        report["rss_bytes"]["drift_after_warmup_pct"] = round(100.0 * (valid_rss[-1][1] - first) / first, 2)
        report["rss_bytes"]["drift_from_start_pct"] = round(100.0 * (valid_rss[-1][1] - valid_rss[0][1])
                                                            / valid_rss[0][1], 2)
    _print(report)
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0 if not errors and health == 200 else 1


def _print(r: dict) -> None:
    out = sys.stderr if r.get("_quiet") else sys.stdout
    mb = lambda v: f"{v / 2**20:.1f} MiB" if v else "?"      # noqa: E731
    print(f"soak {r['url']}: {r['duration_s']} s, concurrency {r['concurrency']}: {r['requests']} requests "
          f"({r['requests_per_s']}/s), {r['rejected_429_503']} rejected with Retry-After", file=out)
    for kind, outcomes in sorted(r["by_kind"].items()):
        print(f"  {kind:10s} " + ", ".join(f"{o}={n}" for o, n in sorted(outcomes.items())), file=out)
    print(f"  errors: {r['errors'] or 'none'}", file=out)
    for k, ex in r["error_examples"].items():
        print(f"    e.g. {k}: {ex}", file=out)
    for kind, p in sorted(r["latency_s"].items()):
        if p:
            print(f"  latency {kind:10s} p50 {p['p50']:.3f}  p90 {p['p90']:.3f}  p99 {p['p99']:.3f}  max {p['max']:.3f} s",
                  file=out)
    if r["ttft_s"]:
        t = r["ttft_s"]
        print(f"  ttft (streams)     p50 {t['p50']:.3f}  p90 {t['p90']:.3f}  p99 {t['p99']:.3f}  max {t['max']:.3f} s",
              file=out)
    rss = r["rss_bytes"]
    print(f"  server RSS: start {mb(rss['start'])}, after warm-up {mb(rss['after_warmup'])}, end {mb(rss['end'])}, "
          f"max {mb(rss['max'])}; drift after warm-up {rss.get('drift_after_warmup_pct', '?')} %", file=out)
    print(f"  /health after: {r['health_after']}", file=out)


if __name__ == "__main__":
    sys.exit(main())
