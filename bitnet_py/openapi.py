"""The OpenAPI 3.1 document served at /openapi.json: request bodies of the OpenAI endpoints as this server
validates them (limits from `protocol` and the loaded model), plus the error shape every 4xx/5xx uses.

It is written from the same constants as `protocol`, so a fuzzer that generates requests from it exercises
exactly the documented ranges and, by stepping outside them, the validation paths.
"""
from __future__ import annotations

import logging

from bitnet_py.protocol import MIN_REPEAT_PENALTY, MAX_MESSAGES, MAX_N, MAX_STOP, MAX_STOP_LEN, Limits, _ROLES
from bitnet_py.sampling import MAX_LOGIT_BIAS_ENTRIES, MAX_TOP_LOGPROBS

logger = logging.getLogger(__name__)


def _num(lo: float, hi: float) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi}


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _sampling_properties(limits: Limits) -> dict:
    stop_item = {"type": "string", "maxLength": MAX_STOP_LEN}
    return {
        "model": {"type": "string", "description": "ignored: the server serves one model"},
        "max_tokens": _int(1, limits.ctx_size),
        "temperature": _num(0, 100),
        "top_p": _num(0, 1),
        "top_k": _int(-1, limits.n_vocab),
        "min_p": _num(0, 1),
        "presence_penalty": _num(-2, 2),
        "frequency_penalty": _num(-2, 2),
        "repeat_penalty": _num(MIN_REPEAT_PENALTY, 100),
        "repeat_last_n": _int(-1, limits.ctx_size),
        "seed": {"type": "integer", "minimum": -(2 ** 63), "maximum": 2 ** 64 - 1},
        "n": _int(1, MAX_N),
        "stop": {"oneOf": [stop_item, {"type": "array", "items": stop_item, "maxItems": MAX_STOP}]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "logit_bias": {"type": "object", "maxProperties": MAX_LOGIT_BIAS_ENTRIES,
                       "propertyNames": {"pattern": "^[0-9]+$"},
                       "additionalProperties": _num(-100, 100),
                       "description": f"token id (0..{limits.n_vocab - 1}) -> bias",
                       "x-token-id-maximum": limits.n_vocab - 1},
        "ignore_eos": {"type": "boolean"},
        "user": {"type": "string"},
    }


def completion_request(limits: Limits) -> dict:
    token_ids = {"type": "array", "minItems": 1, "maxItems": limits.ctx_size - 1,
                 "items": _int(0, limits.n_vocab - 1)}
    props = _sampling_properties(limits)
    props.update({
        "prompt": {"oneOf": [{"type": "string"}, token_ids]},
        "logprobs": _int(0, MAX_TOP_LOGPROBS),
        "echo": {"type": "boolean"},
        "best_of": _int(1, MAX_N),
    })
    return {"type": "object", "required": ["prompt"], "properties": props}


def chat_request(limits: Limits) -> dict:
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role"],
               "properties": {"role": {"enum": sorted(_ROLES)},
                              "content": {"oneOf": [{"type": "string"}, {"type": "null"},
                                                    {"type": "array", "items": text_part}]},
                              "name": {"type": "string"}}}
    props = _sampling_properties(limits)
    props.update({
        "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": message},
        "max_completion_tokens": _int(1, limits.ctx_size),
        "logprobs": {"type": "boolean"},
        "top_logprobs": _int(0, MAX_TOP_LOGPROBS),
        "response_format": {"type": "object", "properties": {"type": {"const": "text"}}},
    })
    return {"type": "object", "required": ["messages"], "properties": props}


ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {}}}}}


def _operation(summary: str, schema_ref: str) -> dict:
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}},
        "responses": {"200": {"description": "JSON body, or text/event-stream when stream is true"},
                      "400": {"description": "invalid request", **err},
                      "401": {"description": "missing or wrong API key", **err},
                      "413": {"description": "body too large", **err},
                      "429": {"description": "rate limited", **err},
                      "503": {"description": "queue full, loading or shutting down (Retry-After)", **err}}}}


def openapi_document(limits: Limits, title: str = "bitnet-py") -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": {"/v1/completions": _operation("Text completion", "CompletionRequest"),
                  "/v1/chat/completions": _operation("Chat completion", "ChatCompletionRequest")},
        "components": {"schemas": {"CompletionRequest": completion_request(limits),
                                   "ChatCompletionRequest": chat_request(limits),
                                   "Error": ERROR}},
    }
