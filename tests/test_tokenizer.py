"""Tokenizer vs the recorded references: bitnet.cpp (llama.cpp) ids and pieces for the 6 GGUF files, and HF
`tokenizers` ids for tiny-bitnet-b158 (metadata built from its tokenizer.json)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bitnet_py.gguf.constants import Keys, TokenType
from bitnet_py.gguf.reader import GGUFFile
from bitnet_py.tokenizer import Tokenizer
from bitnet_py.tokenizer_hf import metadata_from_hf_tokenizer
from conftest import fixture_path, load_reference

GGUF_CASES = [(m, k) for m in ("tiny-bitnet", "tiny-llama") for k in ("f32", "i2_s", "tl2")]
_TOK_CACHE: dict[str, Tokenizer] = {}


def gguf_tokenizer(model: str, kind: str) -> Tokenizer:
    key = f"{model}/{kind}"
    if key not in _TOK_CACHE:
        meta = GGUFFile(fixture_path(model, f"ggml-model-{kind}.gguf")).metadata
        _TOK_CACHE[key] = Tokenizer.from_gguf_metadata(meta)
    return _TOK_CACHE[key]


def b158_tokenizer() -> Tokenizer:
    if "b158" not in _TOK_CACHE:
        _TOK_CACHE["b158"] = Tokenizer.from_gguf_metadata(metadata_from_hf_tokenizer(fixture_path("tiny-bitnet-b158", "hf")))
    return _TOK_CACHE["b158"]


ALL_CASES = [*GGUF_CASES, ("tiny-bitnet-b158", "hf")]


def tokenizer_for(model: str, kind: str) -> Tokenizer:
    return b158_tokenizer() if kind == "hf" else gguf_tokenizer(model, kind)


@pytest.mark.parametrize("model,kind", ALL_CASES)
def test_prompt_ids_match_reference(model, kind, prompts):
    tok = tokenizer_for(model, kind)
    ref = load_reference(model, kind)
    assert [r["prompt"] for r in ref["results"]] == prompts
    for r in ref["results"]:
        assert tok.encode(r["prompt"]) == r["prompt_ids"], r["prompt"]
        if "llama_tokenize_cli_ids" in r:
            assert tok.encode(r["prompt"]) == r["llama_tokenize_cli_ids"]


@pytest.mark.parametrize("model,kind", GGUF_CASES)
def test_server_tokenize_without_bos(model, kind):
    tok = gguf_tokenizer(model, kind)
    for r in load_reference(model, kind)["results"]:
        assert tok.encode(r["prompt"], add_bos=False) == r["server"]["tokenize_no_bos"], r["prompt"]


@pytest.mark.parametrize("model,kind", ALL_CASES)
def test_token_bytes_match_reference_pieces(model, kind):
    tok = tokenizer_for(model, kind)
    for r in load_reference(model, kind)["results"]:
        assert [tok.token_bytes(i).hex() for i in r["prompt_ids"]] == r["prompt_pieces_hex"]
        assert [tok.token_bytes(i).hex() for i in r["gen_ids"]] == r["gen_pieces_hex"]


@pytest.mark.parametrize("model,kind", ALL_CASES)
def test_decode_matches_generated_text(model, kind):
    tok = tokenizer_for(model, kind)
    for r in load_reference(model, kind)["results"]:
        text = tok.decode(r["gen_ids"])
        assert text == r["gen_text"]
        assert text == bytes.fromhex(r["gen_text_hex"]).decode("utf-8", errors="replace")


def test_decode_skip_special_drops_control_tokens():
    tok = b158_tokenizer()
    ref = load_reference("tiny-bitnet-b158", "hf")
    r = next(r for r in ref["results"] if r["prompt"] == "")  # its generation contains BOS (2045)
    assert ref["tokenizer"]["bos"] in r["gen_ids"]
    kept = b"".join(bytes.fromhex(h) for i, h in zip(r["gen_ids"], r["gen_pieces_hex"]) if i != ref["tokenizer"]["bos"])
    assert tok.decode(r["gen_ids"], skip_special=True) == kept.decode("utf-8", errors="replace")
    assert "<|begin_of_text|>" in tok.decode(r["gen_ids"])
    # SentencePiece: the BOS piece "<s>" is rendered only without skip_special
    spm = gguf_tokenizer("tiny-bitnet", "f32")
    ids = load_reference("tiny-bitnet", "f32")["results"][0]["prompt_ids"]
    assert spm.decode(ids).startswith("<s>")
    assert not spm.decode(ids, skip_special=True).startswith("<s>")


def test_hf_metadata_builder_matches_readme_mapping():
    meta = metadata_from_hf_tokenizer(fixture_path("tiny-bitnet-b158", "hf"))
    ref_tok = load_reference("tiny-bitnet-b158", "hf")["tokenizer"]
    hf_cfg = json.loads(fixture_path("tiny-bitnet-b158", "hf", "tokenizer_config.json").read_text())
    assert meta[Keys.TOKENIZER_MODEL] == "gpt2"
    assert meta[Keys.TOKENIZER_PRE] == "llama-bpe"
    assert len(meta[Keys.TOKENS]) == 2048
    assert len(meta[Keys.MERGES]) == ref_tok["n_merges"]
    types = meta[Keys.TOKEN_TYPE]
    assert isinstance(types, np.ndarray)
    assert list(types[2045:]) == [TokenType.CONTROL] * 3
    assert np.all(types[:ref_tok["n_regular"]] == TokenType.NORMAL)
    assert meta[Keys.BOS_ID] == ref_tok["bos"] and meta[Keys.EOS_ID] == ref_tok["eos"]
    assert meta[Keys.EOT_ID] == ref_tok["eot_id"]
    assert meta[Keys.ADD_BOS] is True and meta[Keys.ADD_EOS] is False
    assert meta[Keys.CHAT_TEMPLATE] == hf_cfg["chat_template"]


def test_chat_text_with_special_tokens_parsed():
    tok = b158_tokenizer()
    chat = load_reference("tiny-bitnet-b158", "hf")["chat"]
    ids = tok.encode(chat["rendered"], parse_special=True)
    assert ids == chat["ids_with_bos"]
    assert [tok.token_bytes(i).hex() for i in ids] == chat["pieces_hex"]


def test_special_tokens_not_parsed_by_default():
    tok = b158_tokenizer()
    chat = load_reference("tiny-bitnet-b158", "hf")["chat"]
    plain = tok.encode(chat["rendered"])
    assert 2047 not in plain and plain.count(2045) == 1  # only the added BOS
    assert tok.decode(plain, skip_special=True) == chat["rendered"]  # the marker text survives as text
    assert tok.encode("<|eot_id|>", add_bos=False, parse_special=True) == [2047]
    assert 2047 not in tok.encode("<|eot_id|>", add_bos=False)
    spm = gguf_tokenizer("tiny-bitnet", "f32")
    assert 2 not in spm.encode("a</s>b", add_bos=False)
    assert 2 in spm.encode("a</s>b", add_bos=False, parse_special=True)


def test_spm_space_prefix_restarts_after_special_token():
    # llama.cpp prefixes "▁" to every text fragment that follows a special token (or starts the text)
    spm = gguf_tokenizer("tiny-bitnet", "f32")
    ids = spm.encode("fox</s>dog", add_bos=False, parse_special=True)
    assert ids == spm.encode("fox", add_bos=False) + [2] + spm.encode("dog", add_bos=False)


def test_empty_text_and_add_bos_flag():
    for model, kind in GGUF_CASES:
        tok = gguf_tokenizer(model, kind)
        assert tok.encode("", add_bos=False) == []
        assert tok.encode("") == [tok.bos_id]


def test_ids_and_stop_ids_from_metadata():
    spm = gguf_tokenizer("tiny-bitnet", "i2_s")  # README: <unk>=0, <s>=1, </s>=2, add_bos true
    assert (spm.vocab_size, spm.bos_id, spm.eos_id, spm.add_bos) == (2048, 1, 2, True)
    assert spm.stop_ids == frozenset({2})
    bpe = gguf_tokenizer("tiny-llama", "i2_s")  # <|begin_of_text|>=0, <|end_of_text|>=1
    assert (bpe.bos_id, bpe.eos_id, bpe.eot_id) == (0, 1, None)
    assert bpe.stop_ids == frozenset({1})
    b158 = b158_tokenizer()  # eos 2046, <|eot_id|> 2047 also ends a turn
    assert (b158.bos_id, b158.eos_id, b158.eot_id) == (2045, 2046, 2047)
    assert b158.stop_ids == frozenset({2046, 2047})


def test_eot_found_by_text_when_metadata_has_none():
    meta = metadata_from_hf_tokenizer(fixture_path("tiny-bitnet-b158", "hf"))
    del meta[Keys.EOT_ID]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.eot_id == 2047 and 2047 in tok.stop_ids


def test_is_special():
    spm = gguf_tokenizer("tiny-bitnet", "f32")
    assert spm.is_special(0) and spm.is_special(1) and spm.is_special(2)  # <unk>, <s>, </s>
    assert not spm.is_special(3) and not spm.is_special(500)  # byte token, normal piece
    b158 = b158_tokenizer()
    assert b158.is_special(2047) and not b158.is_special(0)


def test_bad_input_raises_clear_errors():
    tok = b158_tokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(2048)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, -1])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    meta = metadata_from_hf_tokenizer(fixture_path("tiny-bitnet-b158", "hf"))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre"):
        Tokenizer.from_gguf_metadata({**meta, Keys.TOKENIZER_PRE: "no-such-pre"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({**meta, Keys.TOKENIZER_MODEL: "wpm"})
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != Keys.MERGES})
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({})


# Beyond the 8 prompts: the README records that llama.cpp's ids equal HF `tokenizers` (tokenizer.json) and
# `sentencepiece` (tokenizer.model) ids for these vocabularies, so those libraries serve as live references
# for more edge cases (contractions, digit runs, CR/LF, runs of spaces, tabs, mixed scripts).
EXTRA_TEXTS = [
    "I'M here, you're THERE; don't 'quote' it'll",
    "1234567 12 1 000 3.14159 -42",
    "line1\r\nline2\n\n\nline3\r\r",
    "a  b   c    d \t\t e\u00a0f\u3000g",
    "   \n  \t",
    "ÀÉÎõü ß ΑΒΓ добрый день 你好世界 🙂🙃 👍🏽",
    "x" * 300 + " " + "the " * 50,
    "<|eot_id|> <s> </s> [INST]",
]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bitnet-b158"])
def test_bpe_matches_hf_tokenizers_on_extra_texts(model):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(fixture_path(model, "hf", "tokenizer.json")))
    tok = b158_tokenizer() if model == "tiny-bitnet-b158" else gguf_tokenizer("tiny-llama", "f32")
    for text in EXTRA_TEXTS:
        if "<|eot_id|>" in text and model == "tiny-bitnet-b158":
            text = text.replace("<|eot_id|>", "<|eot_id>")  # HF always splits added tokens out
        assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, text


def test_spm_matches_sentencepiece_on_extra_texts():
    spm_lib = pytest.importorskip("sentencepiece")
    sp = spm_lib.SentencePieceProcessor(model_file=str(fixture_path("tiny-bitnet", "hf", "tokenizer.model")))
    tok = gguf_tokenizer("tiny-bitnet", "f32")
    for text in EXTRA_TEXTS:
        assert tok.encode(text) == [tok.bos_id, *sp.encode(text)], text
