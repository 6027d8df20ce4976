"""tokenizer.json -> GGUF tokenizer metadata: pre-tokenizer chosen by behaviour (ids compared with HF `tokenizers`),
Falcon3 naming, llama.cpp's treatment of added tokens, and one conversion through the converter.

Variants are built from the tiny-bitnet-b158 / tiny-llama fixture tokenizer.json files by rewriting only the
pre-tokenizer (or adding added tokens); the reference ids are always HF `tokenizers` on the rewritten file."""
from __future__ import annotations

import ast
import copy
import json
import shutil

import pytest
from tokenizers import Tokenizer as HFTokenizer

from bitnet_py import tokenizer_hf
from bitnet_py.gguf.constants import Keys, TokenType
from bitnet_py.tokenizer import Tokenizer
from bitnet_py.tokenizer_bpe import LLAMA3_REGEX
from bitnet_py.tokenizer_hf import metadata_from_hf_tokenizer
from conftest import fixture_path

B158 = fixture_path("tiny-bitnet-b158", "hf")
BASE = json.loads((B158 / "tokenizer.json").read_text(encoding="utf-8"))

# Llama-3's regex with the case-insensitive group spelled out: same behaviour, different text
SPELLED_OUT = LLAMA3_REGEX.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                                   "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool, trim_offsets: bool = True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": use_regex}


LLAMA3_LIKE = {
    "spelled-out regex": {"type": "Sequence", "pretokenizers": [_split(SPELLED_OUT), _byte_level(False)]},
    "nested sequence": {"type": "Sequence", "pretokenizers": [
        {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX)]}, _byte_level(False, trim_offsets=False)]},
}
FALCON1_STYLE = {"type": "Sequence", "pretokenizers": [
    {"type": "Punctuation", "behavior": "Contiguous"}, _byte_level(True), {"type": "Digits", "individual_digits": True}]}

# texts for the id comparison, distinct from tokenizer_hf.PROBE_TEXTS (which drive the detection)
TEXTS = [
    *json.loads(fixture_path("prompts.json").read_text(encoding="utf-8")),
    "It'S 10:45 -- WE'LL meet at 221B Baker St.\r\n\tBring 3,500,000 coins!!",
    "  Ça va?  Ждём  ответа…\n\n  (ok)  ",
    "print('x' * 1024)  # 🐍🐍\n",
]


def _write(tmp_path, tj: dict, tokenizer_config: dict | None = None, config: dict | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    tcfg = json.loads((B158 / "tokenizer_config.json").read_text(encoding="utf-8"))
    tcfg.update(tokenizer_config or {})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg), encoding="utf-8")
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


def _variant(pre_tokenizer: dict | None = None, ignore_merges: bool | None = None, added: list | None = None) -> dict:
    tj = copy.deepcopy(BASE)
    if pre_tokenizer is not None:
        tj["pre_tokenizer"] = pre_tokenizer
    if ignore_merges is not None:
        tj["model"]["ignore_merges"] = ignore_merges
    tj["added_tokens"].extend(added or [])
    return tj


def _assert_same_ids_as_hf(hf_dir, meta: dict) -> None:
    ours = Tokenizer.from_gguf_metadata(meta)
    hf = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, text


# ---- (a) equivalent pre-tokenizers are recognised by behaviour --------------------------------------------
@pytest.mark.parametrize("variant", sorted(LLAMA3_LIKE))
def test_llama3_equivalent_spelling_is_detected(tmp_path, variant):
    pre_tok = LLAMA3_LIKE[variant]
    assert pre_tok != BASE["pre_tokenizer"]  # not the fixture's own JSON
    hf_dir = _write(tmp_path, _variant(pre_tok))
    meta = metadata_from_hf_tokenizer(hf_dir)
    assert meta[Keys.TOKENIZER_PRE] == "llama-bpe"
    _assert_same_ids_as_hf(hf_dir, meta)


def test_gpt2_bytelevel_is_detected(tmp_path):
    hf_dir = _write(tmp_path, _variant(_byte_level(True), ignore_merges=False))
    meta = metadata_from_hf_tokenizer(hf_dir)
    assert meta[Keys.TOKENIZER_PRE] == "gpt2"
    _assert_same_ids_as_hf(hf_dir, meta)


def test_suggested_candidate_is_built_first_and_alone(tmp_path, monkeypatch):
    built = []
    real = tokenizer_hf.BPEEncoder

    def counting(tokens, merges, pre):
        built.append(pre)
        return real(tokens, merges, pre)

    monkeypatch.setattr(tokenizer_hf, "BPEEncoder", counting)
    metadata_from_hf_tokenizer(B158)
    assert built == ["llama-bpe"]
    built.clear()
    metadata_from_hf_tokenizer(_write(tmp_path, _variant(_byte_level(True), ignore_merges=False)))
    assert built == ["gpt2"]


# ---- (b) a really different pre-tokenizer gets a clear error -----------------------------------------------
def test_falcon1_style_pre_tokenizer_is_rejected_with_details(tmp_path):
    hf_dir = _write(tmp_path, _variant(FALCON1_STYLE))
    with pytest.raises(ValueError) as info:
        metadata_from_hf_tokenizer(hf_dir)
    msg = str(info.value)
    assert str(hf_dir / "tokenizer.json") in msg
    assert "Sequence[Punctuation, ByteLevel, Digits]" in msg
    for name in ("llama-bpe", "gpt2", "default"):  # each candidate reports where it first differs
        assert f"{name}: first differs on " in msg
    # the reported text really is tokenized differently by HF and by that candidate
    hf = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    text = msg.split("llama-bpe: first differs on ")[1].split(" (HF ")[0]
    text = ast.literal_eval(text)  # a repr() the module wrote
    assert text in tokenizer_hf.PROBE_TEXTS
    base = Tokenizer.from_gguf_metadata(metadata_from_hf_tokenizer(B158))
    assert base.encode(text, add_bos=False) != hf.encode(text, add_special_tokens=False).ids


def test_not_a_bpe_model_is_rejected(tmp_path):
    tj = _variant()
    tj["model"]["type"] = "Unigram"
    with pytest.raises(ValueError, match="only byte-level BPE"):
        metadata_from_hf_tokenizer(_write(tmp_path, tj))


# ---- (c) Falcon3 naming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer_config, config, expect", [
    ({"name_or_path": "tiiuae/Falcon3-1B-Instruct-1.58bit"}, None, "falcon3"),
    ({}, {"_name_or_path": "tiiuae/Falcon3-7B-Instruct-1.58bit", "architectures": ["LlamaForCausalLM"]}, "falcon3"),
    ({"name_or_path": "tiiuae/falcon-7b"}, {"_name_or_path": "meta-llama/Meta-Llama-3-8B"}, "llama-bpe"),
    ({}, None, "llama-bpe"),
])
def test_falcon3_name_only_when_the_configs_say_so(tmp_path, tokenizer_config, config, expect):
    hf_dir = _write(tmp_path, _variant(LLAMA3_LIKE["spelled-out regex"]), tokenizer_config, config)
    meta = metadata_from_hf_tokenizer(hf_dir)
    assert meta[Keys.TOKENIZER_PRE] == expect
    tok = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != Keys.ADD_BOS})
    assert tok.add_bos  # both names are the Llama-3 type, which adds BOS by default (llama.cpp)
    _assert_same_ids_as_hf(hf_dir, meta)


def test_falcon3_name_needs_llama3_behaviour(tmp_path):
    hf_dir = _write(tmp_path, _variant(_byte_level(True), ignore_merges=False),
                    {"name_or_path": "tiiuae/Falcon3-1B-Instruct"})
    assert metadata_from_hf_tokenizer(hf_dir)[Keys.TOKENIZER_PRE] == "gpt2"


# ---- (d) added tokens as llama.cpp's converter stores them --------------------------------------------------
def _added(i: int, content: str, normalized: bool, special: bool) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def test_added_tokens_like_llama_cpp(tmp_path):
    vocab = BASE["model"]["vocab"]
    nl, tabs = vocab["Ċ"], vocab["ĉĉ"]  # byte-level spellings of "\n" and "\t\t"
    added = [_added(nl, "Ċ", normalized=False, special=False), _added(tabs, "ĉĉ", normalized=False, special=True),
             _added(2048, "<|fim_middle|>", normalized=False, special=False),
             _added(2049, "a\u2581b", normalized=True, special=False)]
    hf_dir = _write(tmp_path, _variant(added=added))
    meta = metadata_from_hf_tokenizer(hf_dir)
    tokens, types = meta[Keys.TOKENS], meta[Keys.TOKEN_TYPE]
    hf = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))

    def round_trip(text):  # what transformers' decode(encode(text, add_special_tokens=False)) gives
        return hf.decode(hf.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)

    assert tokens[nl] == round_trip("Ċ") == "\n" and types[nl] == TokenType.USER_DEFINED
    assert tokens[tabs] == round_trip("ĉĉ") == "\t\t" and types[tabs] == TokenType.CONTROL
    assert tokens[2048] == "<|fim_middle|>" and types[2048] == TokenType.CONTROL  # looks special
    assert tokens[2049] == "a b" and types[2049] == TokenType.USER_DEFINED  # normalized: kept, "▁" -> " "
    assert meta[Keys.TOKENIZER_PRE] == "llama-bpe"  # added tokens do not disturb the detection
    assert [types[i] for i in (2045, 2046, 2047)] == [TokenType.CONTROL] * 3

    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.token_bytes(nl) == b"\n" and tok.token_bytes(tabs) == b"\t\t"
    assert tok.encode("x\ny", add_bos=False) == hf.encode("x\ny", add_special_tokens=False).ids


def test_normalized_added_token_is_kept_verbatim(tmp_path):
    nl = BASE["model"]["vocab"]["Ċ"]
    meta = metadata_from_hf_tokenizer(_write(tmp_path, _variant(added=[_added(nl, "Ċ", True, False)])))
    assert meta[Keys.TOKENS][nl] == "Ċ"


# ---- end to end: the converter on tiny-llama with a rewritten tokenizer.json ---------------------------------
def test_convert_with_equivalent_pre_tokenizer_named_falcon3(tmp_path):
    from bitnet_py.convert import convert
    from bitnet_py.gguf.reader import GGUFFile
    from bitnet_py.model import Model

    src = fixture_path("tiny-llama", "hf")
    hf_dir = tmp_path / "Falcon3-tiny"
    shutil.copytree(src, hf_dir)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = LLAMA3_LIKE["spelled-out regex"]
    (hf_dir / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    tcfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tcfg["name_or_path"] = "tiiuae/Falcon3-1B-Instruct-1.58bit"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tcfg), encoding="utf-8")

    out = convert(str(hf_dir), "i2_s", str(tmp_path / "m.gguf"), progress=False)
    meta = GGUFFile(out).metadata
    ref = GGUFFile(fixture_path("tiny-llama", "ggml-model-i2_s.gguf")).metadata  # bitnet.cpp's conversion
    assert meta[Keys.TOKENIZER_PRE] == "falcon3"
    assert list(meta[Keys.TOKENS]) == list(ref[Keys.TOKENS])
    assert list(meta[Keys.MERGES]) == list(ref[Keys.MERGES])
    tok = Model.load(out).tokenizer
    hf = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text).ids, text  # BOS added by both
