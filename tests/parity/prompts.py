"""Prompt sets of the parity suite: the fixtures' 8 prompts, a long one, multi-turn chats."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"

_PARAGRAPH = ("It was a dark and stormy night; the rain fell in torrents, except at occasional intervals, when it "
              "was checked by a violent gust of wind which swept up the streets. Numbers like 3.14159, 2,718 and "
              "-42% went by, with a price of $19.99 (or 17,50 EUR) and a date: 2024-10-18. ")


@lru_cache(maxsize=1)
def fixture_prompts() -> tuple[str, ...]:
    return tuple(json.loads((FIXTURES / "prompts.json").read_text()))


def long_prompt(n_paragraphs: int = 6) -> str:
    """~700-750 tokens with the tiny vocabularies: longer than one 512-token micro-batch."""
    return "".join(f"[{i}] {_PARAGRAPH}" for i in range(n_paragraphs))


MULTI_TURN: tuple[tuple[dict, ...], ...] = (
    ({"role": "user", "content": "Tell me a fortune."},),
    ({"role": "system", "content": "You are a terse oracle."},
     {"role": "user", "content": "Will it rain tomorrow?"},
     {"role": "assistant", "content": "Clouds gather where doubts linger."},
     {"role": "user", "content": "And the day after?"}),
    ({"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello. What is on your mind?"},
     {"role": "user", "content": "Ünïcödé, 日本語, emoji 🙂 — translate nothing, just continue."},
     {"role": "assistant", "content": "  Spaces\tand tabs are kept. "},
     {"role": "user", "content": "Good. One more line, please."}),
)


def completion_prompts() -> list[tuple[str, str]]:
    """(id, prompt text) for /completion and /tokenize: the fixtures' prompts and the long one."""
    out = [(f"fixture{i}", p) for i, p in enumerate(fixture_prompts())]
    out.append(("long", long_prompt()))
    return out
