"""GGUF tokenizer metadata (tokenizer.ggml.*) from a Hugging Face byte-level BPE tokenizer.json.

Used by the converter. The result feeds `bitnet_py.tokenizer.Tokenizer.from_gguf_metadata`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .gguf.constants import Keys, TokenType
from .tokenizer_bpe import LLAMA3_REGEX, split_merge


def _token_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _find_split_regex(pre_tok: dict | None) -> str | None:
    if not pre_tok:
        return None
    if pre_tok.get("type") == "Sequence":
        for p in pre_tok.get("pretokenizers", []):
            r = _find_split_regex(p)
            if r is not None:
                return r
        return None
    if pre_tok.get("type") == "Split":
        return pre_tok.get("pattern", {}).get("Regex")
    return None


def _has_gpt2_bytelevel(pre_tok: dict | None) -> bool:
    if not pre_tok:
        return False
    if pre_tok.get("type") == "Sequence":
        return any(_has_gpt2_bytelevel(p) for p in pre_tok.get("pretokenizers", []))
    return pre_tok.get("type") == "ByteLevel" and pre_tok.get("use_regex", True)


def metadata_from_hf_tokenizer(hf_dir) -> dict:
    """GGUF tokenizer metadata (Keys.* -> value) from a HF byte-level BPE tokenizer.json +
    tokenizer_config.json. Added tokens marked special become CONTROL, others USER_DEFINED."""
    hf_dir = Path(hf_dir)
    tj_path = hf_dir / "tokenizer.json"
    if not tj_path.exists():
        raise ValueError(f"{tj_path} not found (only byte-level BPE tokenizer.json files are supported)")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    cfg_path = hf_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{tj_path}: only byte-level BPE models are supported (got {model.get('type')!r})")

    regex = _find_split_regex(tj.get("pre_tokenizer"))
    if regex == LLAMA3_REGEX:
        pre = "llama-bpe"
    elif regex is None and _has_gpt2_bytelevel(tj.get("pre_tokenizer")):
        pre = "gpt2"
    else:
        raise ValueError(f"{tj_path}: unrecognized pre-tokenizer (regex {regex!r})")

    id_to_text: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: int(TokenType.NORMAL) for i in id_to_text}
    for added in tj.get("added_tokens", []):
        i = int(added["id"])
        id_to_text[i] = added["content"]
        types[i] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    n = max(id_to_text) + 1
    tokens = [id_to_text.get(i, f"[PAD{i}]") for i in range(n)]
    token_type = np.array([types.get(i, int(TokenType.UNUSED)) for i in range(n)], dtype=np.int32)
    merges = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            split_merge(m)
            merges.append(m)
        else:
            merges.append(f"{m[0]} {m[1]}")

    text_to_id = {t: i for i, t in enumerate(tokens)}

    def lookup(text: str | None) -> int | None:
        return text_to_id.get(text) if text is not None else None

    bos = lookup(_token_text(cfg.get("bos_token")))
    eos = lookup(_token_text(cfg.get("eos_token")))
    eot = None
    end_of_text = lookup("<|end_of_text|>")
    if eos is not None and tokens[eos] == "<|eot_id|>" and end_of_text is not None:
        eos, eot = end_of_text, eos  # Llama-3 convention: EOS = end of text, EOT = end of turn
    elif lookup("<|eot_id|>") is not None:
        eot = lookup("<|eot_id|>")

    meta: dict = {
        Keys.TOKENIZER_MODEL: "gpt2",
        Keys.TOKENIZER_PRE: pre,
        Keys.TOKENS: tokens,
        Keys.TOKEN_TYPE: token_type,
        Keys.MERGES: merges,
        Keys.ADD_BOS: bool(cfg.get("add_bos_token", bos is not None)),
        Keys.ADD_EOS: bool(cfg.get("add_eos_token", False)),
    }
    for key, value in ((Keys.BOS_ID, bos), (Keys.EOS_ID, eos), (Keys.EOT_ID, eot),
                       (Keys.UNK_ID, lookup(_token_text(cfg.get("unk_token")))),
                       (Keys.PAD_ID, lookup(_token_text(cfg.get("pad_token"))))):
        if value is not None:
            meta[key] = int(value)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = hf_dir / "chat_template.jinja"
    if template is None and jinja_file.exists():
        template = jinja_file.read_text(encoding="utf-8")
    if template:
        meta[Keys.CHAT_TEMPLATE] = template
    return meta
