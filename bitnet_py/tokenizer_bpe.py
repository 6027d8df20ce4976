"""Byte-level BPE (GGUF `tokenizer.ggml.model` = "gpt2") as llama.cpp runs it.

The text is cut into pre-tokens by one or more regexes (chosen by `tokenizer.ggml.pre`), each pre-token is
mapped byte by byte through the GPT-2 byte<->unicode table, and merged by merge rank (lowest first, leftmost
first on ties). With `ignore_merges` (Llama-3 family) a pre-token that is itself a vocabulary entry is emitted
as that one token. The merge loop and the regex splitting run in the HF `tokenizers` library (Rust), which is
configured here from the GGUF vocabulary, merges and regex text; the reference ids in the fixtures check that
this reproduces bitnet.cpp's tokens.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

log = logging.getLogger(__name__)

# Pre-tokenizer regexes (data, not code). Several regexes are applied one after another: each one splits
# every piece left by the previous ones into its matches and the unmatched text between them.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's fallback for BPE vocabularies whose pre-tokenizer is "default" (or missing)
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regexes, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": (DEFAULT_REGEXES, False),
    "gpt2": ((GPT2_REGEX,), False),
}
for _name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"):
    PRE_TOKENIZERS[_name] = ((LLAMA3_REGEX,), True)


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """The GPT-2 table: printable Latin-1 bytes map to themselves, the other 68 to U+0100 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE: dict[int, str] = _gpt2_byte_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


def bpe_token_bytes(text: str) -> bytes:
    """Bytes of a byte-level BPE vocabulary entry (characters outside the table are kept as UTF-8)."""
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def split_merge(merge: str) -> tuple[str, str]:
    """'left right' -> (left, right). Byte-level pieces never hold a literal space, so split at the first."""
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise ValueError(f"malformed BPE merge {merge!r} (expected 'left right')")
    return left, right


class BPEEncoder:
    """Encodes plain text (no special-token matching: the caller splits those off) into token ids."""

    def __init__(self, tokens: Sequence[str], merges: Iterable[str], pre: str):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"unsupported tokenizer.ggml.pre {pre!r} for a gpt2 (BPE) vocabulary; "
                f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        regexes, ignore_merges = PRE_TOKENIZERS[pre]
        self.pre = pre
        self.ignore_merges = ignore_merges
        texts = list(tokens)  # decoded once (the GGUF vocabulary may be a lazy StringArray)
        vocab: dict[str, int] = {}
        for i, t in enumerate(texts):
            vocab[t] = i  # a repeated text maps to its last id, as llama.cpp's text->id map does
        # pairs reuse the vocabulary's str objects, so the ~280k tuples add no strings of their own
        pairs = []
        dropped = 0
        for m in merges:
            left, right = split_merge(m)
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None and left + right in vocab:
                pairs.append((texts[li], texts[ri]))
            else:
                dropped += 1
        del texts
        if dropped:
            log.warning("ignoring %d BPE merges whose pieces or result are not in the vocabulary", dropped)
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False,
                           byte_fallback=False)
        hf = HFTokenizer(model)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._hf = hf

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._hf.encode(text, add_special_tokens=False).ids

    def pre_tokenize(self, text: str) -> list[str]:
        """The byte-mapped pre-tokens of `text` (for debugging and tests)."""
        return [piece for piece, _ in self._hf.pre_tokenizer.pre_tokenize_str(text)]
