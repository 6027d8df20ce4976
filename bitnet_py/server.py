"""Starlette app: OpenAI-compatible and llama-server-native HTTP API in front of the engine thread.

Handlers validate (protocol), tokenize (in the thread pool), submit to the engine and wait for its events on an
asyncio queue; they never run kernels. A client that disconnects (streaming or not, during prefill too) cancels
its request, which frees its KV blocks at the next engine step.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bitnet_py import protocol as P
from bitnet_py.openapi import openapi_document
from bitnet_py.engine import Engine, EngineError, GenerationRequest
from bitnet_py.metrics import CONTENT_TYPE
from bitnet_py.server_stream import Generation, event_stream, token_piece
from bitnet_py.protocol import APIError

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})


@dataclass
class ServerSettings:
    model_alias: str = "bitnet"
    model_path: str = ""
    api_key: str | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    request_timeout: float | None = 600.0     # seconds from submission to the last token; None = no limit
    cors_origins: tuple[str, ...] = ()        # empty: no CORS headers at all (browsers cannot call the API)
    max_headers: int = 100                    # header count; their total size is capped by the HTTP parser
    max_header_bytes: int = 16 * 1024


def _digest(key: bytes) -> bytes:
    """Keys are compared as SHA-256 digests: equal length, so compare_digest leaks not even the key's length."""
    return hashlib.sha256(key).digest()


def json_error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class GuardMiddleware:
    """Header limits (431), API key on every route but /health (constant-time compare), JSON 500 for anything
    unhandled. The key is never logged."""

    def __init__(self, app, api_key: str | None, max_headers: int = 100, max_header_bytes: int = 16 * 1024) -> None:
        self.app = app
        self.key_digest = _digest(api_key.encode("utf-8")) if api_key else None
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes

    def _authorized(self, scope) -> bool:
        if self.key_digest is None or scope.get("path") in OPEN_PATHS:
            return True
        presented = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
            elif name == b"x-api-key" and not presented:
                presented = value.strip()
        return hmac.compare_digest(_digest(presented), self.key_digest)

    def _headers_too_large(self, scope) -> bool:
        headers = scope.get("headers", ())
        return len(headers) > self.max_headers or \
            sum(len(k) + len(v) + 4 for k, v in headers) > self.max_header_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._headers_too_large(scope):
            err = APIError(431, f"Request headers too large (at most {self.max_headers} headers, "
                                f"{self.max_header_bytes} bytes)", "invalid_request_error")
            await json_error(err)(scope, receive, send)
            return
        if not self._authorized(scope):
            err = APIError(401, "Invalid API key", "authentication_error", code="invalid_api_key")
            await json_error(err)(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:                      # noqa: BLE001
            logger.exception("unhandled error on %s", scope.get("path"))
            if not started:
                err = APIError(500, "Internal server error", "server_error")
                await json_error(err)(scope, receive, send)


class Api:
    """The route handlers, bound to one engine."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.created = int(time.time())

    # ---- helpers ---------------------------------------------------------------------------------------------
    def require_ready(self) -> P.Limits:
        state = self.engine.state
        if state == "ready":
            return P.Limits(n_vocab=self.engine.n_vocab, ctx_size=self.engine.max_model_len)
        if state == "loading":
            raise APIError(503, "Loading model", "unavailable_error", headers={"Retry-After": "5"})
        raise APIError(503, f"Model unavailable ({self.engine.load_error or state})", "unavailable_error",
                       headers={"Retry-After": "30"})

    async def read_json(self, request: Request) -> dict:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"Request body larger than {limit} bytes", "invalid_request_error")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"Request body larger than {limit} bytes", "invalid_request_error")
            chunks.append(chunk)
        return P.parse_json_body(b"".join(chunks))

    async def tokenize_prompt(self, prompt: str | list[int], parse_special: bool = True) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        tok = self.engine.tokenizer
        return await run_in_threadpool(tok.encode, prompt, None, parse_special)

    async def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        template = self.engine.chat_template
        if template is None:
            raise APIError(400, "This model has no chat template; use /v1/completions", param="messages")
        try:
            return await run_in_threadpool(template.encode, messages, True)
        except Exception as exc:      # noqa: BLE001 - jinja raises many kinds; the messages are the cause
            logger.info("chat template rejected a request: %s: %s", type(exc).__name__, exc)
            raise P.bad("messages", f"Chat template rejected the messages: {type(exc).__name__}") from None

    def start(self, request: Request, prompt_ids: list[int], gen: P.GenParams, kind: str,
              use_prefix_cache: bool = True) -> Generation:
        if len(prompt_ids) >= self.engine.max_model_len:
            raise P.bad("messages" if kind == "chat" else "prompt",
                        f"This model's maximum context length is {self.engine.max_model_len} tokens; the prompt has "
                        f"{len(prompt_ids)} tokens")
        req = GenerationRequest(prompt_ids=prompt_ids, params=gen.sampling, n=gen.n, max_tokens=gen.max_tokens,
                                stop=gen.stop, ignore_eos=gen.ignore_eos, use_prefix_cache=use_prefix_cache,
                                request_id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}")
        generation = Generation(self.engine, req, request, kind, len(prompt_ids), self.settings.request_timeout)
        try:
            generation.submit()
        except EngineError as exc:
            headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
            raise APIError(exc.status, str(exc), exc.err_type, exc.param, headers=headers) from None
        return generation

    # ---- routes ----------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        state = self.engine.state
        if self.engine.draining:
            return JSONResponse({"error": {"code": 503, "message": "Shutting down", "type": "unavailable_error"}},
                                status_code=503, headers={"Retry-After": "5"})
        if state == "ready":
            return JSONResponse({"status": "ok"})
        if state == "loading":
            return JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                                status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"error": {"code": 500, "message": f"Model failed to load: {self.engine.load_error}",
                                       "type": "server_error"}}, status_code=500)

    async def models(self, request: Request) -> Response:
        meta = {}
        if self.engine.state == "ready":
            meta = {"n_vocab": self.engine.n_vocab, "n_ctx": self.engine.max_model_len}
        return JSONResponse({"object": "list", "data": [{"id": self.settings.model_alias, "object": "model",
                                                         "created": self.created, "owned_by": "bitnet-py",
                                                         "meta": meta}]})

    async def completions(self, request: Request) -> Response:
        body = await self.read_json(request)
        limits = self.require_ready()
        req = P.parse_completion(body, limits)
        if req.echo and req.gen.sampling.logprobs is not None:
            raise P.bad("echo", "'echo' together with 'logprobs' is not supported")
        ids = await self.tokenize_prompt(req.prompt)
        gen = self.start(request, ids, req.gen, "completion")
        if req.echo:
            gen.echo_text = req.prompt if isinstance(req.prompt, str) else self.engine.tokenizer.decode(ids)
        return await self.respond(gen, req.gen)

    async def chat_completions(self, request: Request) -> Response:
        body = await self.read_json(request)
        limits = self.require_ready()
        req = P.parse_chat(body, limits)
        ids = await self.chat_prompt_ids(req.messages)
        gen = self.start(request, ids, req.gen, "chat")
        return await self.respond(gen, req.gen)

    async def native_completion(self, request: Request) -> Response:
        body = await self.read_json(request)
        limits = self.require_ready()
        req = P.parse_native_completion(body, limits)
        ids = await self.tokenize_prompt(req.prompt)
        gen = self.start(request, ids, req.gen, "native", use_prefix_cache=req.cache_prompt)
        gen.prompt_text = req.prompt if isinstance(req.prompt, str) else ""
        return await self.respond(gen, req.gen)

    async def respond(self, gen: Generation, params: P.GenParams) -> Response:
        model = self.settings.model_alias
        if params.stream:
            return event_stream(gen, model, params.include_usage)
        await gen.wait()
        return JSONResponse(gen.final_body(model))

    async def tokenize(self, request: Request) -> Response:
        body = await self.read_json(request)
        limits = self.require_ready()
        content = P.get_str(body, "content")
        if content is None:
            raise P.bad("content", "'content' is required")
        add_special = P.get_bool(body, "add_special", False)
        parse_special = P.get_bool(body, "parse_special", True)
        tok = self.engine.tokenizer
        ids = await run_in_threadpool(tok.encode, content, add_special, parse_special)
        if P.get_bool(body, "with_pieces", False):
            pieces = []
            for t in ids:
                text, raw = token_piece(tok, t)
                pieces.append({"id": t, "piece": text if not text.startswith("bytes:") else list(raw)})
            return JSONResponse({"tokens": pieces})
        del limits
        return JSONResponse({"tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body = await self.read_json(request)
        limits = self.require_ready()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise P.bad("tokens", "'tokens' must be a list of token ids")
        if any(not 0 <= t < limits.n_vocab for t in tokens):
            raise P.bad("tokens", f"token ids must be in [0, {limits.n_vocab})")
        text = await run_in_threadpool(self.engine.tokenizer.decode, tokens)
        return JSONResponse({"content": text})

    async def props(self, request: Request) -> Response:
        limits = self.require_ready()
        defaults = P.parse_sampling({}, limits, None, (), None).sampling
        template = self.engine.chat_template
        return JSONResponse({
            "default_generation_settings": {"n_ctx": limits.ctx_size, "temperature": defaults.temperature,
                                            "top_k": defaults.top_k, "top_p": defaults.top_p,
                                            "min_p": defaults.min_p, "repeat_penalty": defaults.repeat_penalty,
                                            "repeat_last_n": defaults.repeat_last_n, "n_predict": -1},
            "total_slots": self.engine.config.max_num_seqs,
            "model_alias": self.settings.model_alias,
            "model_path": self.settings.model_path,
            "chat_template": getattr(template, "source", None) or "",
            "modalities": {"vision": False, "audio": False},
            "build_info": "bitnet-py",
        })

    async def slots(self, request: Request) -> Response:
        limits = self.require_ready()
        busy = {s["id"]: s for s in self.engine.stats().get("slots", [])}
        out = []
        for i in range(self.engine.config.max_num_seqs):
            s = busy.get(i)
            out.append({"id": i, "n_ctx": limits.ctx_size, "is_processing": s is not None,
                        "id_task": s["request_id"] if s else None,
                        "n_prompt_tokens": s["n_prompt_tokens"] if s else 0,
                        "n_decoded": s["n_decoded"] if s else 0})
        return JSONResponse(out)

    async def openapi(self, request: Request) -> Response:
        if self.engine.state == "ready":
            limits = P.Limits(n_vocab=self.engine.n_vocab, ctx_size=self.engine.max_model_len)
        else:                                   # documented before the model is up: generic limits
            limits = P.Limits(n_vocab=1 << 17, ctx_size=8192)
        return JSONResponse(openapi_document(limits, title=f"bitnet-py ({self.settings.model_alias})"))

    async def metrics(self, request: Request) -> Response:
        return Response(self.engine.metrics.render(), media_type=CONTENT_TYPE)


def _wrap(handler: Callable) -> Callable:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as err:
            return json_error(err)
    endpoint.__name__ = handler.__name__
    return endpoint


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = {404: "Not found", 405: "Method not allowed"}.get(status, str(getattr(exc, "detail", "error")))
    return json_error(APIError(status, f"{message}: {request.method} {request.url.path}",
                               "not_found_error" if status == 404 else "invalid_request_error"))


def create_app(engine: Engine, settings: ServerSettings | None = None, start_engine: bool = True) -> Starlette:
    settings = settings or ServerSettings()
    api = Api(engine, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.shutdown)

    post, get = ["POST"], ["GET"]
    routes = [
        Route("/health", api.health, methods=get),
        Route("/metrics", api.metrics, methods=get),
        Route("/v1/models", _wrap(api.models), methods=get),
        Route("/models", _wrap(api.models), methods=get),
        Route("/v1/completions", _wrap(api.completions), methods=post),
        Route("/completions", _wrap(api.completions), methods=post),
        Route("/v1/chat/completions", _wrap(api.chat_completions), methods=post),
        Route("/chat/completions", _wrap(api.chat_completions), methods=post),
        Route("/completion", _wrap(api.native_completion), methods=post),
        Route("/tokenize", _wrap(api.tokenize), methods=post),
        Route("/detokenize", _wrap(api.detokenize), methods=post),
        Route("/props", _wrap(api.props), methods=get),
        Route("/slots", _wrap(api.slots), methods=get),
        Route("/openapi.json", _wrap(api.openapi), methods=get),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_exception})
    app.state.engine = engine
    app.state.api = api
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_headers=settings.max_headers,
                       max_header_bytes=settings.max_header_bytes)
    if settings.cors_origins:                  # outermost, so browser preflights (no key) are answered
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key"], max_age=600)
    return app

