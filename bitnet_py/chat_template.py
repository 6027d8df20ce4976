"""Chat templates: the model's jinja2 template (GGUF `tokenizer.chat_template`) or a built-in fallback.

Templates run in jinja2's ImmutableSandboxedEnvironment with the helpers Hugging Face provides
(`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII) and the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`. Bad messages and template errors raise ValueError.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .gguf.constants import Keys

log = logging.getLogger(__name__)

ROLES = frozenset({"system", "user", "assistant", "tool"})

# microsoft/BitNet-b1.58-2B-4T (Llama-3 vocabulary with <|eot_id|>): "System: ...<|eot_id|>User: ..."
BITNET_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
# generic fallback (what llama.cpp's server uses for a model without a template)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateRaisedError(Exception):
    """Raised by a template's own raise_exception(...) call."""


def _raise_exception(message):
    raise TemplateRaisedError(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def validate_messages(messages) -> list[dict]:
    """Check the chat messages; returns them as a list of plain dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    checked = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        content = msg.get("content")
        if content is None and role == "assistant" and msg.get("tool_calls"):
            pass  # an assistant turn that only calls tools
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        checked.append(dict(msg))
    return checked


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "model",
                 tokenizer=None):
        if not isinstance(source, str) or not source.strip():
            raise ValueError("chat template is empty")
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.tokenizer = tokenizer
        try:
            self._template = _make_environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template ({name}) does not parse: {e.message} (line {e.lineno})") from e

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tokenizer) -> "ChatTemplate":
        """The model's template if the metadata has one, else a built-in one chosen by the vocabulary:
        the BitNet 2B-4T format when the vocabulary has <|eot_id|>, ChatML otherwise."""
        bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
        eos = tokenizer.tokens[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
        source = meta.get(Keys.CHAT_TEMPLATE)
        if isinstance(source, str) and source.strip():
            return cls(source, bos, eos, name="model", tokenizer=tokenizer)
        if "<|eot_id|>" in tokenizer.tokens:
            log.info("no chat template in the model; using the built-in BitNet 2B-4T format")
            return cls(BITNET_TEMPLATE, bos, eos, name="bitnet", tokenizer=tokenizer)
        log.info("no chat template in the model; using the built-in ChatML format")
        return cls(CHATML_TEMPLATE, bos, eos, name="chatml", tokenizer=tokenizer)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for `messages`. Extra keyword arguments become template variables (e.g. tools)."""
        checked = validate_messages(messages)
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
                   "messages": checked, "add_generation_prompt": bool(add_generation_prompt)}
        try:
            return self._template.render(**context)
        except TemplateRaisedError as e:
            raise ValueError(f"chat template ({self.name}) rejected the messages: {e}") from e
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"chat template ({self.name}) attempted an unsafe operation: {e}") from e
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template ({self.name}) failed: {e}") from e
        except (TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
            raise ValueError(f"chat template ({self.name}) failed on these messages: {e!r}") from e

    def encode(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """Rendered prompt -> token ids with special tokens parsed. The model's BOS is added unless the
        rendered text already starts with it (templates that emit {{ bos_token }} themselves)."""
        if self.tokenizer is None:
            raise ValueError("this ChatTemplate has no tokenizer")
        text = self.render(messages, add_generation_prompt, **extra)
        add_bos = self.tokenizer.add_bos and not (self.bos_token and text.startswith(self.bos_token))
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=True)
