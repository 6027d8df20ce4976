"""HTTP API shapes: validation of request bodies (OpenAI and llama-server) and construction of response bodies.

Everything a client sends is checked here, before it reaches the tokenizer or the engine; a bad field raises
`APIError` naming it. Unknown fields are ignored (clients send many harmless extras); wrong types are 400.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from bitnet_py.sampling import MAX_TOP_LOGPROBS, SamplingParams, SamplingParamsError

MAX_N = 16
MAX_STOP = 16
MAX_STOP_LEN = 1000
MAX_MESSAGES = 4096
MIN_REPEAT_PENALTY = 0.001     # the penalty divides logits: ~0 would turn them into inf


class APIError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error",
                 param: str | None = None, code: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.err_type, self.param, self.code)


def _safe(text: str | None) -> str | None:
    """Strings echoed into an error must encode as UTF-8 (a lone surrogate would break the response)."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, err_type: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": _safe(message), "type": err_type, "param": _safe(param),
                      "code": status if code is None else code}}


def bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


# ---- JSON body ----------------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _first_surrogate_path(value: Any, path: str = "") -> str | None:
    """Path (`messages[0].content`) of the first string holding a lone surrogate, keys included."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_surrogate_path(item, f"{path}[{i}]")
            if found:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            found = _first_surrogate_path(key, sub) or _first_surrogate_path(item, sub)
            if found:
                return found.encode("utf-8", "backslashreplace").decode("ascii")
    return None


def parse_json_body(raw: bytes) -> dict:
    if not raw:
        raise bad(None, "Request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # name the field that holds the bad bytes: decode them to lone surrogates and look for those
        try:
            where = _first_surrogate_path(json.loads(raw.decode("utf-8", "surrogateescape"),
                                                     parse_constant=_reject_constant))
        except (ValueError, RecursionError):
            where = None
        raise bad(where, f"Request body is not valid UTF-8{f' (in {where!r})' if where else ''}") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad(None, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad(None, "Request body must be a JSON object")
    return body


# ---- typed field access ---------------------------------------------------------------------------------------
def check_text(param: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, f"'{param}' contains invalid Unicode (lone surrogate)") from None
    return value


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(name, f"'{name}' must be a string")
    return check_text(name, v)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be a boolean")
    return v


def get_int(body: dict, name: str, default: int | None = None, lo: int | None = None,
            hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise bad(name, f"'{name}' must be in {rng}, got {v}")
    return v


def get_float(body: dict, name: str, default: float | None = None, lo: float | None = None,
              hi: float | None = None) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"'{name}' must be a finite number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be in [{lo}, {hi}], got {v}")
    return float(v)


@dataclass(frozen=True)
class Limits:
    """What the loaded model allows (filled in by the server once the engine is ready)."""

    n_vocab: int
    ctx_size: int


@dataclass
class GenParams:
    """Generation settings common to every endpoint."""

    sampling: SamplingParams
    max_tokens: int | None
    n: int = 1
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def _parse_stop(body: dict, name: str = "stop") -> tuple[str, ...]:
    v = body.get(name)
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad(name, f"'{name}' must be a string or a list of strings")
    if len(items) > MAX_STOP:
        raise bad(name, f"'{name}' has {len(items)} entries; at most {MAX_STOP} are allowed")
    for s in items:
        check_text(name, s)
        if len(s) > MAX_STOP_LEN:
            raise bad(name, f"each '{name}' entry must be at most {MAX_STOP_LEN} characters")
    return tuple(s for s in items if s)


def _parse_logit_bias(body: dict, limits: Limits) -> tuple[tuple[int, float], ...]:
    v = body.get("logit_bias")
    if v is None:
        return ()
    pairs: list[tuple[Any, Any]]
    if isinstance(v, dict):                      # OpenAI: {"token id": bias}
        pairs = list(v.items())
    elif isinstance(v, list):                    # llama-server: [[id, bias], ...]; bias false bans the token
        if not all(isinstance(p, list) and len(p) == 2 for p in v):
            raise bad("logit_bias", "'logit_bias' list entries must be [token_id, bias] pairs")
        pairs = [(p[0], p[1]) for p in v]
    else:
        raise bad("logit_bias", "'logit_bias' must be an object mapping token ids to biases")
    out = []
    for key, bias in pairs:
        try:
            tid = int(key) if isinstance(key, str) else key
        except ValueError:
            raise bad("logit_bias", f"logit_bias key {key!r} is not a token id") from None
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < limits.n_vocab:
            raise bad("logit_bias", f"logit_bias token id {key!r} is outside the vocabulary (0..{limits.n_vocab - 1})")
        if bias is False:
            bias = -math.inf
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                and bias != -math.inf:
            raise bad("logit_bias", f"logit_bias value for token {tid} must be a finite number")
        if math.isfinite(bias) and not -100 <= bias <= 100:
            raise bad("logit_bias", "logit_bias values must be in [-100, 100]")
        out.append((tid, float(bias)))
    return tuple(out)


def parse_sampling(body: dict, limits: Limits, logprobs: int | None, max_tokens_keys: tuple[str, ...],
                   default_max_tokens: int | None) -> GenParams:
    max_tokens = default_max_tokens
    for key in max_tokens_keys:
        if body.get(key) is not None:
            value = get_int(body, key, lo=-1 if key == "n_predict" else 1, hi=limits.ctx_size)
            max_tokens = None if value == -1 else value
            break
    seed = get_int(body, "seed", lo=-(2**63), hi=2**64 - 1)
    if seed is not None and seed < 0:
        seed = None if seed == -1 else seed & 0xFFFFFFFFFFFFFFFF       # llama-server: -1 = random
    try:
        sampling = SamplingParams(
            temperature=get_float(body, "temperature", 0.8, 0.0, 100.0),
            top_k=get_int(body, "top_k", 40, -1, limits.n_vocab),
            top_p=get_float(body, "top_p", 0.95, 0.0, 1.0),
            min_p=get_float(body, "min_p", 0.05, 0.0, 1.0),
            repeat_penalty=get_float(body, "repeat_penalty", 1.0, MIN_REPEAT_PENALTY, 100.0),
            repeat_last_n=get_int(body, "repeat_last_n", 64, -1, limits.ctx_size),
            presence_penalty=get_float(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=get_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
            logit_bias=_parse_logit_bias(body, limits),
            seed=seed,
            logprobs=logprobs,
        )
    except SamplingParamsError as exc:
        raise bad(exc.param, str(exc)) from None
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    return GenParams(sampling=sampling, max_tokens=max_tokens, n=get_int(body, "n", 1, 1, MAX_N),
                     stop=_parse_stop(body), stream=get_bool(body, "stream"),
                     include_usage=get_bool(stream_options or {}, "include_usage"),
                     ignore_eos=get_bool(body, "ignore_eos"))


def parse_prompt(body: dict, limits: Limits, name: str = "prompt") -> str | list[int]:
    """A single prompt: a string or a list of token ids (a one-element batch of either is accepted)."""
    v = body.get(name)
    if v is None:
        raise bad(name, f"'{name}' is required")
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return check_text(name, v)
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        if any(not 0 <= t < limits.n_vocab for t in v):
            raise bad(name, f"'{name}' token ids must be in [0, {limits.n_vocab})")
        return list(v)
    if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
        raise bad(name, "Only one prompt per request is supported; send one request per prompt")
    raise bad(name, f"'{name}' must be a string or a non-empty list of token ids")


@dataclass
class CompletionRequest:
    prompt: str | list[int]
    gen: GenParams
    echo: bool = False


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    prompt = parse_prompt(body, limits)
    logprobs = get_int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    gen = parse_sampling(body, limits, logprobs, ("max_tokens",), 16)
    if get_str(body, "suffix"):
        raise bad("suffix", "'suffix' is not supported")
    best_of = get_int(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != gen.n:
        raise bad("best_of", "'best_of' other than n is not supported")
    return CompletionRequest(prompt=prompt, gen=gen, echo=get_bool(body, "echo"))


@dataclass
class ChatRequest:
    messages: list[dict]
    gen: GenParams
    logprobs: bool = False


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "'messages' must be a non-empty list")
    if len(msgs) > MAX_MESSAGES:
        raise bad("messages", f"at most {MAX_MESSAGES} messages are allowed")
    out = []
    for i, m in enumerate(msgs):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(param, f"'{param}' must be an object")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"{param}.role", f"'{param}.role' must be one of {sorted(_ROLES)}")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{param}.content", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise bad(f"{param}.content", f"'{param}.content' must be a string or a list of text parts")
        check_text(f"{param}.content", content)
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = check_text(f"{param}.name", m["name"])
        out.append(msg)
    return out


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    messages = parse_messages(body)
    want = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs", "'top_logprobs' requires 'logprobs': true")
    gen = parse_sampling(body, limits, (top or 0) if want else None, ("max_completion_tokens", "max_tokens"), None)
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(name, f"'{name}' is not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", None)):
        raise bad("response_format", "only response_format {'type': 'text'} is supported")
    return ChatRequest(messages=messages, gen=gen, logprobs=want)


@dataclass
class NativeCompletionRequest:
    prompt: str | list[int]
    gen: GenParams
    n_probs: int = 0
    cache_prompt: bool = True


def parse_native_completion(body: dict, limits: Limits) -> NativeCompletionRequest:
    prompt = parse_prompt(body, limits)
    n_probs = get_int(body, "n_probs", 0, 0, MAX_TOP_LOGPROBS)
    gen = parse_sampling(body, limits, n_probs if n_probs else None, ("n_predict", "max_tokens"), None)
    gen.n = 1
    return NativeCompletionRequest(prompt=prompt, gen=gen, n_probs=n_probs,
                                   cache_prompt=get_bool(body, "cache_prompt", True))
