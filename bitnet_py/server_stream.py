"""One HTTP request's generation: engine events -> choices -> OpenAI / llama-server bodies and SSE chunks.

`Generation` lives on the event loop: the engine thread hands it events with `loop.call_soon_threadsafe`.
`event_stream` is an ASGI response that streams SSE and cancels the request as soon as the client goes away
(it listens for `http.disconnect` itself, so a disconnect during a long prefill is noticed at once).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from bitnet_py.protocol import APIError
from bitnet_py.sampling import TokenLogprob
from bitnet_py.sequence import SeqEvent

logger = logging.getLogger(__name__)

_DISCONNECTED = object()


class _LoopMailbox:
    """Hands engine events to one event loop with one wake-up per batch (an engine step emits an event per
    sequence; waking the loop for each would cost a self-pipe write and a loop iteration apiece, and the loop's
    Python work competes with the engine thread for the GIL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, object]] = []
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item: object) -> None:      # any thread
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:              # loop closed (server gone): nobody is listening any more
            with self.lock:
                self.items.clear()
                self.scheduled = False

    def _deliver(self) -> None:                                       # event loop
        with self.lock:
            items, self.items = self.items, []
            self.scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMailbox]" = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _LoopMailbox:
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = _LoopMailbox(loop)
    return box


@dataclass
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_type: str = "none"
    stopping_word: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    error: str | None = None
    slot: int = -1


def usage_dict(choices: list[Choice], prompt_tokens: int) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
             "total_tokens": prompt_tokens + completion}
    cached = max((c.cached_tokens for c in choices), default=0)
    usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def public_finish_reason(reason: str | None) -> str | None:
    """OpenAI's values: a graceful shutdown cut the generation short, which clients know as "length"."""
    return None if reason is None else ("length" if reason in ("length", "shutdown") else "stop")


# ---- logprob shapes ------------------------------------------------------------------------------------------
def token_piece(tokenizer, token_id: int) -> tuple[str, bytes]:
    """(display string, raw bytes) of one token, for logprob listings."""
    try:
        raw = tokenizer.token_bytes(token_id)
    except Exception:            # noqa: BLE001 - an odd id must not break a response
        raw = b""
    if not raw and tokenizer.is_special(token_id):
        text = tokenizer.decode([token_id])
        return text, text.encode("utf-8")
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int) -> dict:
    """Legacy /v1/completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text, _ = token_piece(tokenizer, e.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({token_piece(tokenizer, t)[0]: lp for t, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    content = []
    for e in entries:
        text, raw = token_piece(tokenizer, e.token_id)
        top = []
        for t, lp in e.top:
            ttext, traw = token_piece(tokenizer, t)
            top.append({"token": ttext, "logprob": lp, "bytes": list(traw)})
        content.append({"token": text, "logprob": e.logprob, "bytes": list(raw), "top_logprobs": top})
    return {"content": content, "refusal": None}


def native_probs(tokenizer, entries: list[TokenLogprob]) -> list[dict]:
    """llama-server /completion `completion_probabilities` (n_probs)."""
    out = []
    for e in entries:
        text, raw = token_piece(tokenizer, e.token_id)
        top = []
        for t, lp in e.top:
            ttext, traw = token_piece(tokenizer, t)
            top.append({"id": t, "token": ttext, "logprob": lp, "bytes": list(traw)})
        out.append({"id": e.token_id, "token": text, "logprob": e.logprob, "bytes": list(raw), "top_logprobs": top})
    return out


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class Generation:
    """Collects the engine's events for one request (n choices)."""

    def __init__(self, engine, req, request: Request, kind: str, prompt_tokens: int,
                 timeout: float | None = None) -> None:
        self.engine = engine
        self.req = req
        self.request = request
        self.kind = kind                      # "completion" | "chat" | "native"
        self.prompt_tokens = prompt_tokens
        self.loop = asyncio.get_running_loop()
        self.mailbox = _mailbox(self.loop)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(i) for i in range(req.n)]
        self.pending = req.n
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.cancelled = False
        self.timeout = timeout
        self.timed_out = False
        self._timer: asyncio.TimerHandle | None = None
        self.echo_text: str | None = None
        self.prompt_text = ""
        self.offsets = [0] * req.n            # text offsets for legacy logprobs

    @property
    def id(self) -> str:
        return self.req.request_id

    @property
    def done(self) -> bool:
        return self.pending == 0

    def submit(self) -> None:
        self.engine.submit(self.req, self._emit)
        if self.timeout:
            self._timer = self.loop.call_later(self.timeout, self._on_timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        if not self.done and not self.cancelled:
            self.timed_out = self.cancelled = True
            self.engine.cancel(self.id)
            self.queue.put_nowait(_DISCONNECTED)
            logger.warning("%s timed out after %.0f s", self.id, self.timeout)

    def _emit(self, event: SeqEvent) -> None:          # engine thread
        self.mailbox.post(self.queue, event)

    def cancel(self) -> None:                           # event loop
        self._stop_timer()          # a pending timer would keep this request (and its connection) alive
        if not self.done and not self.cancelled:
            self.cancelled = True
            self.engine.cancel(self.id)
            self.queue.put_nowait(_DISCONNECTED)
            logger.info("%s cancelled (client disconnected)", self.id)

    async def events(self) -> AsyncIterator[SeqEvent]:
        while self.pending:
            event = await self.queue.get()
            if event is _DISCONNECTED:
                return
            self._apply(event)
            yield event

    def _apply(self, ev: SeqEvent) -> None:
        c = self.choices[ev.index]
        c.text.append(ev.text)
        c.token_ids.extend(ev.token_ids)
        if ev.logprobs:
            c.logprobs.extend(ev.logprobs)
        if ev.finish_reason is not None:
            c.finish_reason = ev.finish_reason
            c.stop_type = ev.stop_type or "none"
            c.stopping_word = ev.stopping_word
            c.completion_tokens = ev.completion_tokens
            c.cached_tokens = ev.cached_tokens
            c.prompt_seconds = ev.prompt_seconds
            c.decode_seconds = ev.decode_seconds
            c.error = ev.error
            c.slot = ev.slot
            self.pending -= 1
            if self.pending == 0:
                self._stop_timer()
                self._log_done()

    def _log_done(self) -> None:
        gen = sum(c.completion_tokens for c in self.choices)
        decode = max((c.decode_seconds for c in self.choices), default=0.0)
        prompt_s = max((c.prompt_seconds for c in self.choices), default=0.0)
        speed = (gen - len(self.choices)) / decode if decode > 0 and gen > len(self.choices) else 0.0
        reasons = ",".join(sorted({c.finish_reason or "?" for c in self.choices}))
        logger.info("%s done: prompt %d tokens (%d cached) in %.3f s, generated %d tokens in %.3f s (%.1f tok/s), "
                    "n=%d, finish=%s, total %.3f s", self.id, self.prompt_tokens,
                    max(c.cached_tokens for c in self.choices), prompt_s, gen, decode, speed, len(self.choices),
                    reasons, time.perf_counter() - self.started)

    def error(self) -> APIError | None:
        if self.timed_out:
            return APIError(504, f"Request timed out after {self.timeout:g} s", "timeout_error")
        for c in self.choices:
            if c.finish_reason == "error":
                if "shutting down" in (c.error or ""):
                    return APIError(503, c.error or "", "unavailable_error", headers={"Retry-After": "5"})
                return APIError(500, c.error or "generation failed", "server_error")
        return None

    def cut_before_start(self) -> bool:
        """A graceful shutdown ended the request before it produced anything (non-streaming: answer 503)."""
        return any(c.finish_reason == "shutdown" for c in self.choices) and \
            not any(c.completion_tokens for c in self.choices)

    async def wait(self) -> None:
        """Non-streaming: run to completion, cancelling if the client disconnects meanwhile."""
        watcher = asyncio.create_task(self._watch_disconnect(self.request.receive))
        try:
            async for _ in self.events():
                pass
        finally:
            watcher.cancel()
            self.cancel()
        err = self.error()
        if err is not None:
            raise err
        if self.cut_before_start():
            raise APIError(503, "Server is shutting down", "unavailable_error", headers={"Retry-After": "5"})

    async def _watch_disconnect(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.cancel()
                return

    # ---- bodies -------------------------------------------------------------------------------------------
    def _text(self, c: Choice) -> str:
        text = "".join(c.text)
        return (self.echo_text or "") + text if self.kind == "completion" else text

    def _lp_completion(self, c: Choice, entries: list[TokenLogprob]) -> dict | None:
        if self.req.params.logprobs is None:
            return None
        out = completion_logprobs(self.engine.tokenizer, entries, self.offsets[c.index])
        self.offsets[c.index] += sum(len(t) for t in out["tokens"])
        return out

    def _lp_chat(self, entries: list[TokenLogprob]) -> dict | None:
        if self.req.params.logprobs is None:
            return None
        return chat_logprobs(self.engine.tokenizer, entries)

    def final_body(self, model: str) -> dict:
        usage = usage_dict(self.choices, self.prompt_tokens)
        if self.kind == "completion":
            choices = [{"index": c.index, "text": self._text(c), "logprobs": self._lp_completion(c, c.logprobs),
                        "finish_reason": public_finish_reason(c.finish_reason)} for c in self.choices]
            return {"id": self.id, "object": "text_completion", "created": self.created, "model": model,
                    "choices": choices, "usage": usage, "system_fingerprint": None}
        if self.kind == "chat":
            choices = [{"index": c.index, "message": {"role": "assistant", "content": self._text(c)},
                        "logprobs": self._lp_chat(c.logprobs),
                        "finish_reason": public_finish_reason(c.finish_reason)} for c in self.choices]
            return {"id": self.id, "object": "chat.completion", "created": self.created, "model": model,
                    "choices": choices, "usage": usage, "system_fingerprint": None}
        return self.native_final(model)

    def native_final(self, model: str) -> dict:
        c = self.choices[0]
        text = "".join(c.text)
        n_gen = c.completion_tokens
        prompt_n = self.prompt_tokens - c.cached_tokens
        body = {"index": 0, "content": text, "tokens": c.token_ids, "id_slot": c.slot, "stop": True,
                "model": model, "tokens_predicted": n_gen, "tokens_evaluated": self.prompt_tokens,
                "prompt": self.prompt_text, "has_new_line": "\n" in text, "truncated": False,
                "stop_type": c.stop_type, "stopping_word": c.stopping_word, "tokens_cached": c.cached_tokens,
                "timings": {"prompt_n": prompt_n, "prompt_ms": c.prompt_seconds * 1e3,
                            "prompt_per_token_ms": c.prompt_seconds * 1e3 / max(1, prompt_n),
                            "prompt_per_second": prompt_n / c.prompt_seconds if c.prompt_seconds else 0.0,
                            "predicted_n": n_gen, "predicted_ms": c.decode_seconds * 1e3,
                            "predicted_per_token_ms": c.decode_seconds * 1e3 / max(1, n_gen - 1),
                            "predicted_per_second": (n_gen - 1) / c.decode_seconds if c.decode_seconds else 0.0}}
        if self.req.params.logprobs is not None:
            body["completion_probabilities"] = native_probs(self.engine.tokenizer, c.logprobs)
        return body

    def chunks(self, model: str, include_usage: bool) -> AsyncIterator[bytes]:
        return _chunks(self, model, include_usage)


async def _chunks(g: Generation, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    kind = g.kind
    head = {"id": g.id, "created": g.created, "model": model, "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}
    if kind == "chat":
        for c in g.choices:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [
                {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}], **extra})
    elif kind == "completion" and g.echo_text:
        for c in g.choices:
            g.offsets[c.index] = len(g.echo_text)
            yield sse({**head, "object": "text_completion", "choices": [
                {"index": c.index, "text": g.echo_text, "logprobs": None, "finish_reason": None}], **extra})
    async for ev in g.events():
        if ev.finish_reason == "error":
            break
        if not (ev.text or ev.logprobs or ev.finish_reason):
            continue
        finish = public_finish_reason(ev.finish_reason)
        if kind == "completion":
            choice = {"index": ev.index, "text": ev.text, "logprobs": g._lp_completion(g.choices[ev.index],
                                                                                        ev.logprobs or []),
                      "finish_reason": finish}
            yield sse({**head, "object": "text_completion", "choices": [choice], **extra})
        elif kind == "chat":
            delta = {"content": ev.text} if (ev.text or not ev.finish_reason) else {}
            choice = {"index": ev.index, "delta": delta, "logprobs": g._lp_chat(ev.logprobs or []),
                      "finish_reason": finish}
            yield sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})
        elif ev.finish_reason is None:
            body = {"index": 0, "content": ev.text, "tokens": ev.token_ids, "stop": False, "id_slot": ev.slot}
            if g.req.params.logprobs is not None:
                body["completion_probabilities"] = native_probs(g.engine.tokenizer, ev.logprobs or [])
            yield sse(body)
        else:
            final = g.native_final(model)
            final["content"] = ev.text
            final["tokens"] = ev.token_ids
            if g.req.params.logprobs is not None:
                final["completion_probabilities"] = native_probs(g.engine.tokenizer, ev.logprobs or [])
            yield sse(final)
    if g.cancelled and not g.timed_out:
        return
    err = g.error()
    if err is not None:
        yield sse(err.body())
    elif include_usage and kind != "native":
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        yield sse({**head, "object": obj, "choices": [], "usage": usage_dict(g.choices, g.prompt_tokens)})
    if kind != "native":
        yield b"data: [DONE]\n\n"


class EventStreamResponse(Response):
    """SSE response that watches for the client going away and cancels the generation at once."""

    media_type = "text/event-stream"

    def __init__(self, generation: Generation, body: AsyncIterator[bytes]) -> None:
        self.generation = generation
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        g = self.generation
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = asyncio.create_task(g._watch_disconnect(receive))
        try:
            async for data in self.body_iterator:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            g.cancel()
        finally:
            watcher.cancel()
            g.cancel()
            await self.body_iterator.aclose()


def event_stream(generation: Generation, model: str, include_usage: bool) -> EventStreamResponse:
    return EventStreamResponse(generation, generation.chunks(model, include_usage))

