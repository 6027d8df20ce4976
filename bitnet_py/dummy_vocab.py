"""Synthetic vocabularies for dummy models: byte-level BPE with Llama-3-style special tokens, or SentencePiece.

Both are valid for their tokenizer kind (every merge joins two earlier tokens into a new one; SentencePiece
pieces are unique with byte-fallback tokens) and have exactly the requested size; texts are random but
deterministic for a seed. Generation is a Python loop over the vocabulary (~0.3 s for 128K tokens).
"""
from __future__ import annotations

import numpy as np

from .gguf.constants import Keys, TokenType

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
BITNET_2B_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
_LLAMA3_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
                 9: "<|eot_id|>"}


def gpt2_byte_symbols() -> list[str]:
    """The GPT-2 byte -> printable character map, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def llama3_specials(n: int) -> list[str]:
    """Llama 3's special-token texts in id order (reserved ones numbered as Llama 3.0 does)."""
    out, reserved = [], 0
    for i in range(n):
        if i in _LLAMA3_NAMED:
            out.append(_LLAMA3_NAMED[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def _grow(base: list[str], n_total: int, rng: np.random.Generator, joiner) -> tuple[list[str], list[tuple[int, int]]]:
    """Extend `base` to n_total unique strings by joining two earlier ones (biased to short, early ones)."""
    tokens = list(base)
    seen = set(tokens)
    pairs = []
    u = rng.random((2 * n_total + 64, 2)) ** 2
    j = 0
    while len(tokens) < n_total:
        if j >= len(u):
            u = rng.random((2 * n_total + 64, 2)) ** 2
            j = 0
        a, b = int(u[j, 0] * len(tokens)), int(u[j, 1] * len(tokens))
        j += 1
        text = joiner(tokens[a], tokens[b])
        if text is None or text in seen or len(text) > 16:
            continue
        seen.add(text)
        tokens.append(text)
        pairs.append((a, b))
    return tokens, pairs


def synthetic_bpe(n_vocab: int, seed: int, chat_template: str | None) -> dict:
    """gpt2/llama-bpe tokenizer metadata: 256 byte symbols + merges, then Llama-3 specials at the end."""
    n_special = 256 if n_vocab >= 100000 else 10
    n_regular = n_vocab - n_special
    rng = np.random.default_rng(seed + 7919)
    tokens, pairs = _grow(gpt2_byte_symbols(), n_regular, rng, lambda x, y: x + y)
    merges = [f"{tokens[a]} {tokens[b]}" for a, b in pairs]
    specials = llama3_specials(n_special)
    types = np.full(n_vocab, int(TokenType.NORMAL), dtype=np.int32)
    types[n_regular:] = int(TokenType.CONTROL)
    meta = {Keys.TOKENIZER_MODEL: "gpt2", Keys.TOKENIZER_PRE: "llama-bpe", Keys.TOKENS: tokens + specials,
            Keys.TOKEN_TYPE: types, Keys.MERGES: merges, Keys.BOS_ID: n_regular, Keys.EOS_ID: n_regular + 1,
            Keys.EOT_ID: n_regular + 9, Keys.ADD_BOS: True, Keys.ADD_EOS: False}
    if chat_template:
        meta[Keys.CHAT_TEMPLATE] = chat_template
    return meta


def synthetic_sentencepiece(n_vocab: int, seed: int) -> dict:
    """llama (SentencePiece) tokenizer metadata: <unk>, <s>, </s>, 256 byte tokens, then pieces with
    scores = -rank, like the 1bitLLM models' LLaMA vocabulary."""
    rng = np.random.default_rng(seed + 104729)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    base = ["▁"] + letters + ["▁" + c for c in letters] + list("0123456789.,!?'-")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    n_pieces = n_vocab - len(specials)
    pieces, _ = _grow(base, n_pieces, rng, lambda x, y: None if y.startswith("▁") else x + y)
    tokens = specials + pieces
    types = np.full(n_vocab, int(TokenType.NORMAL), dtype=np.int32)
    types[0] = int(TokenType.UNKNOWN)
    types[1:3] = int(TokenType.CONTROL)
    types[3:259] = int(TokenType.BYTE)
    scores = np.zeros(n_vocab, dtype=np.float32)
    scores[259:] = -np.arange(n_pieces, dtype=np.float32)
    return {Keys.TOKENIZER_MODEL: "llama", Keys.TOKENIZER_PRE: "default", Keys.TOKENS: tokens,
            Keys.SCORES: scores, Keys.TOKEN_TYPE: types, Keys.BOS_ID: 1, Keys.EOS_ID: 2,
            Keys.ADD_BOS: True, Keys.ADD_EOS: False}
