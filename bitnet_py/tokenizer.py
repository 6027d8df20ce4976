"""Tokenizer built from GGUF metadata, reproducing llama.cpp's (bitnet.cpp's) token ids and pieces.

Two vocabulary kinds: "gpt2" (byte-level BPE, `tokenizer_bpe`) and "llama" (SentencePiece BPE with byte
fallback, `tokenizer_spm`). Special tokens (CONTROL / UNKNOWN types) are matched in the text only with
`parse_special=True`; USER_DEFINED tokens are always matched, as llama.cpp does. Longer special tokens are
matched first.
"""
from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Sequence

import numpy as np

from .gguf.constants import Keys, TokenType
from .gguf.string_array import StringArray
from .tokenizer_bpe import BPEEncoder, bpe_token_bytes
from .tokenizer_spm import SPM_SPACE, SPMEncoder

log = logging.getLogger(__name__)

# Texts of control tokens that end a turn in the chat formats we know (llama.cpp treats these as
# end-of-generation too).
END_OF_TURN_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
    "<|endoftext|>", "<EOT>",
})
# Searched (in this order) for the end-of-turn id when the metadata names none.
_EOT_CANDIDATES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

_SPECIAL_TYPES = (int(TokenType.CONTROL), int(TokenType.UNKNOWN))


def _optional_id(meta: dict, key: str, n_vocab: int) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    v = int(v)
    if v < 0 or v >= n_vocab:  # -1 / out of range = "no such token" in some converters
        return None
    return v


def _find_texts(tokens: Sequence[str], texts: Iterable[str]) -> dict[str, int]:
    """{text: last id with that text} for those of `texts` in the vocabulary."""
    if isinstance(tokens, StringArray):
        return tokens.find(texts)
    wanted = set(texts)
    return {t: i for i, t in enumerate(tokens) if t in wanted}


class Tokenizer:
    def __init__(self, *, model: str, tokens: Sequence[str], token_types, scores=None, merges=None,
                 pre: str = "default", bos_id: int | None = None, eos_id: int | None = None,
                 eot_id: int | None = None, eom_id: int | None = None, unk_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, add_eos: bool = False,
                 add_space_prefix: bool = True):
        if not tokens:
            raise ValueError("the vocabulary (tokenizer.ggml.tokens) is empty")
        self.model = model
        self.pre = pre
        # the vocabulary as given: a GGUF StringArray stays in the file's map (decoded per lookup)
        self.tokens: Sequence[str] = tokens if isinstance(tokens, StringArray) else list(tokens)
        self.vocab_size: int = len(self.tokens)
        types = np.asarray(token_types if token_types is not None else [TokenType.NORMAL] * self.vocab_size)
        if types.shape != (self.vocab_size,):
            raise ValueError(f"tokenizer.ggml.token_type has shape {types.shape}, vocab has {self.vocab_size}")
        self.token_types = array("i", types.astype(np.int32).tobytes())  # int32[n_vocab]; items are ints
        self.bos_id, self.eos_id, self.eot_id, self.eom_id = bos_id, eos_id, eot_id, eom_id
        self.unk_id, self.pad_id = unk_id, pad_id
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.add_space_prefix = bool(add_space_prefix)

        if model == "gpt2":
            if merges is None:
                raise ValueError("a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges")
            self._encoder = BPEEncoder(self.tokens, merges, pre)
        elif model == "llama":
            self._encoder = SPMEncoder(self.tokens, scores, unk_id)
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama')")

        if self.eot_id is None:
            by_text = _find_texts(self.tokens, _EOT_CANDIDATES)
            self.eot_id = next((by_text[t] for t in _EOT_CANDIDATES if t in by_text), None)
        stops = {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}
        # only CONTROL / UNKNOWN / USER_DEFINED entries can stop or be matched in text: decode just those
        special_ids = np.flatnonzero(np.isin(types, (*_SPECIAL_TYPES, int(TokenType.USER_DEFINED)))).tolist()
        special = [(i, self.tokens[i], self.token_types[i]) for i in special_ids]
        stops.update(i for i, t, ttype in special
                     if t in END_OF_TURN_TEXTS and ttype in (TokenType.CONTROL, TokenType.USER_DEFINED))
        self.stop_ids: frozenset[int] = frozenset(stops)

        # special tokens that can be matched in text, longest first: (text, id, needs parse_special)
        matchable = [(t, i, ttype in _SPECIAL_TYPES) for i, t, ttype in special if t]
        matchable.sort(key=lambda e: -len(e[0].encode("utf-8")))
        self._matchable = matchable
        self._pieces: dict[int, bytes] = {}  # token_bytes cache, filled on use

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        model = meta.get(Keys.TOKENIZER_MODEL)
        if model is None:
            raise ValueError(f"no tokenizer in the metadata ({Keys.TOKENIZER_MODEL} missing)")
        tokens = meta.get(Keys.TOKENS)
        if tokens is None:
            raise ValueError(f"no vocabulary in the metadata ({Keys.TOKENS} missing)")
        n = len(tokens)
        default_add_bos = model == "llama"
        pre = meta.get(Keys.TOKENIZER_PRE) or "default"
        if model == "gpt2" and pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"):
            default_add_bos = True
        return cls(
            model=str(model), tokens=tokens, token_types=meta.get(Keys.TOKEN_TYPE),
            scores=meta.get(Keys.SCORES), merges=meta.get(Keys.MERGES), pre=str(pre),
            bos_id=_optional_id(meta, Keys.BOS_ID, n), eos_id=_optional_id(meta, Keys.EOS_ID, n),
            eot_id=_optional_id(meta, Keys.EOT_ID, n), eom_id=_optional_id(meta, Keys.EOM_ID, n),
            unk_id=_optional_id(meta, Keys.UNK_ID, n), pad_id=_optional_id(meta, Keys.PAD_ID, n),
            add_bos=bool(meta.get(Keys.ADD_BOS, default_add_bos)), add_eos=bool(meta.get(Keys.ADD_EOS, False)),
            add_space_prefix=bool(meta.get(Keys.ADD_SPACE_PREFIX, model == "llama")),
        )

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        from .gguf.reader import GGUFFile
        return cls.from_gguf_metadata(GGUFFile(path).metadata)

    # ---- encoding -----------------------------------------------------------------------------------
    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split `text` into plain-text pieces (str) and matched special tokens (int ids)."""
        parts: list[str | int] = [text]
        for tok_text, tid, needs_parse in self._matchable:
            if needs_parse and not parse_special:
                continue
            if tok_text not in text:
                continue
            new_parts: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or tok_text not in part:
                    new_parts.append(part)
                    continue
                pieces = part.split(tok_text)
                for k, piece in enumerate(pieces):
                    if k:
                        new_parts.append(tid)
                    if piece:
                        new_parts.append(piece)
            parts = new_parts
        return parts

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. add_bos None = the model's setting; the model's add_eos applies unless
        add_bos is False."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        want_bos = self.add_bos if add_bos is None else bool(add_bos)
        ids: list[int] = []
        if want_bos:
            if self.bos_id is None:
                raise ValueError("this model has no BOS token (tokenizer.ggml.bos_token_id) to add")
            ids.append(self.bos_id)
        parts = self._partition(text, parse_special) if text else []
        if self.model == "llama":
            prev_special = True  # a space prefix goes before the first text and after each special token
            for part in parts:
                if isinstance(part, int):
                    ids.append(part)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    part = " " + part
                ids.extend(self._encoder.encode(part.replace(" ", SPM_SPACE)))
                prev_special = False
        else:
            for part in parts:
                if isinstance(part, int):
                    ids.append(part)
                else:
                    ids.extend(self._encoder.encode(part))
        if self.add_eos and add_bos is not False and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    # ---- decoding -----------------------------------------------------------------------------------
    def _check_id(self, token_id) -> int:
        tid = int(token_id)
        if tid < 0 or tid >= self.vocab_size:
            raise ValueError(f"token id {tid} is outside the vocabulary (0..{self.vocab_size - 1})")
        return tid

    def is_special(self, token_id: int) -> bool:
        """CONTROL and UNKNOWN tokens: the ones llama.cpp renders only with special=true."""
        return self.token_types[self._check_id(token_id)] in _SPECIAL_TYPES

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token, like llama.cpp's llama_token_to_piece(special=True)."""
        tid = self._check_id(token_id)
        piece = self._pieces.get(tid)
        if piece is None:
            piece = self._make_piece(tid)
            self._pieces[tid] = piece
        return piece

    def _make_piece(self, tid: int) -> bytes:
        text = self.tokens[tid]
        ttype = self.token_types[tid]
        if ttype in (*_SPECIAL_TYPES, TokenType.USER_DEFINED):
            return text.encode("utf-8")
        if ttype == TokenType.NORMAL:
            if self.model == "gpt2":
                return bpe_token_bytes(text)
            return text.replace(SPM_SPACE, " ").encode("utf-8")
        if ttype == TokenType.BYTE and self.model == "llama":
            return bytes([int(text[3:5], 16)])
        return b""  # UNUSED and anything else renders as nothing

    def decode(self, ids, skip_special: bool = False) -> str:
        """Concatenated token bytes as text (invalid UTF-8 replaced); skip_special drops CONTROL/UNKNOWN."""
        out = []
        for t in ids:
            if skip_special and self.is_special(t):
                continue
            out.append(self.token_bytes(t))
        return b"".join(out).decode("utf-8", errors="replace")
