"""Tokenizer metadata for the converter: SentencePiece `tokenizer.model` or byte-level BPE `tokenizer.json`.

SentencePiece: the ModelProto is parsed here (protobuf wire format; field 1 = repeated SentencePiece
{1: piece, 2: score, 3: type}), so the `sentencepiece` package is not needed. Token types map 1:1 to GGUF's
(NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6). Special ids come from config.json's
`*_token_id` (as bitnet.cpp's converter does; there is no tokenizer.json to look them up in), add_bos/add_eos from
tokenizer_config.json. BPE: `bitnet_py.tokenizer_hf.metadata_from_hf_tokenizer`. Both are padded with `[PAD<i>]`
UNUSED tokens up to the model's vocab_size, and keys are returned in bitnet.cpp's order.
"""
from __future__ import annotations

import json
import logging
import os
import struct

import numpy as np

from .gguf.constants import Keys, TokenType

log = logging.getLogger(__name__)

KEY_ORDER = (Keys.TOKENIZER_MODEL, Keys.TOKENIZER_PRE, Keys.TOKENS, Keys.SCORES, Keys.TOKEN_TYPE, Keys.MERGES,
             Keys.BOS_ID, Keys.EOS_ID, Keys.EOT_ID, Keys.EOM_ID, Keys.UNK_ID, Keys.PAD_ID, Keys.ADD_BOS,
             Keys.ADD_EOS, Keys.ADD_SPACE_PREFIX, Keys.CHAT_TEMPLATE)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def read_sentencepiece(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """tokenizer.model -> (pieces, scores float32, GGUF token types int32)."""
    with open(path, "rb") as f:
        data = f.read()
    pieces, scores, types = [], [], []
    try:
        for field, wire, value in _fields(data):
            if field != 1 or wire != 2:
                continue
            piece, score, ptype = "", 0.0, int(TokenType.NORMAL)
            for f2, w2, v2 in _fields(value):
                if f2 == 1 and w2 == 2:
                    piece = v2.decode("utf-8")
                elif f2 == 2 and w2 == 5:
                    score = struct.unpack("<f", v2)[0]
                elif f2 == 3 and w2 == 0:
                    ptype = v2
            pieces.append(piece)
            scores.append(score)
            types.append(ptype)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise ValueError(f"{path}: no pieces found (not a SentencePiece model?)")
    return pieces, np.array(scores, dtype=np.float32), np.array(types, dtype=np.int32)


def sentencepiece_metadata(hf_dir: str, config: dict) -> dict:
    pieces, scores, types = read_sentencepiece(os.path.join(hf_dir, "tokenizer.model"))
    added = _read_json(os.path.join(hf_dir, "added_tokens.json"))
    for text, i in sorted(added.items(), key=lambda kv: kv[1]):
        if i == len(pieces):
            pieces.append(text)
            scores = np.append(scores, np.float32(-1000.0))
            types = np.append(types, np.int32(TokenType.USER_DEFINED))
    tcfg = _read_json(os.path.join(hf_dir, "tokenizer_config.json"))
    meta = {Keys.TOKENIZER_MODEL: "llama", Keys.TOKENIZER_PRE: "default", Keys.TOKENS: pieces,
            Keys.SCORES: scores, Keys.TOKEN_TYPE: types}
    for key, cfg_key in ((Keys.BOS_ID, "bos_token_id"), (Keys.EOS_ID, "eos_token_id"),
                         (Keys.UNK_ID, "unk_token_id"), (Keys.PAD_ID, "pad_token_id")):
        v = config.get(cfg_key)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < len(pieces):
            meta[key] = v
    if Keys.BOS_ID not in meta or Keys.EOS_ID not in meta:  # fall back to the piece texts
        for key, name in ((Keys.BOS_ID, "bos_token"), (Keys.EOS_ID, "eos_token")):
            text = tcfg.get(name)
            text = text.get("content") if isinstance(text, dict) else text
            if key not in meta and text in pieces:
                meta[key] = pieces.index(text)
    meta[Keys.ADD_BOS] = bool(tcfg.get("add_bos_token", True))
    meta[Keys.ADD_EOS] = bool(tcfg.get("add_eos_token", False))
    template = tcfg.get("chat_template")
    if isinstance(template, str) and template:
        meta[Keys.CHAT_TEMPLATE] = template
    return meta


def bpe_metadata(hf_dir: str, config: dict) -> dict:
    try:
        from .tokenizer_hf import metadata_from_hf_tokenizer
    except ImportError as e:  # pragma: no cover - the tokenizer module is part of the package
        raise ValueError(f"BPE tokenizer conversion needs bitnet_py.tokenizer ({e})") from None
    return metadata_from_hf_tokenizer(hf_dir)


def _pad(meta: dict, n_vocab: int) -> None:
    tokens = list(meta[Keys.TOKENS])
    if len(tokens) > n_vocab:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}")
    extra = n_vocab - len(tokens)
    if not extra:
        return
    log.info("padding the vocabulary with %d [PAD] tokens up to vocab_size %d", extra, n_vocab)
    meta[Keys.TOKENS] = tokens + [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    meta[Keys.TOKEN_TYPE] = np.concatenate([np.asarray(meta[Keys.TOKEN_TYPE], np.int32),
                                            np.full(extra, int(TokenType.UNUSED), np.int32)])
    if Keys.SCORES in meta:
        meta[Keys.SCORES] = np.concatenate([np.asarray(meta[Keys.SCORES], np.float32),
                                            np.full(extra, -1000.0, np.float32)])


def tokenizer_metadata(hf_dir: str, config: dict, n_vocab: int) -> dict:
    """GGUF tokenizer keys for a HF model directory, in bitnet.cpp's key order."""
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        meta = sentencepiece_metadata(hf_dir, config)
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        meta = bpe_metadata(hf_dir, config)
    else:
        raise ValueError(f"{hf_dir}: no tokenizer.model or tokenizer.json")
    _pad(meta, n_vocab)
    ordered = {k: meta[k] for k in KEY_ORDER if k in meta}
    ordered.update({k: v for k, v in meta.items() if k not in ordered})
    return ordered
