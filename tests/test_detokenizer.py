"""Incremental detokenizer vs the reference generations: same text as a whole-sequence decode, emitted in
order, never a premature replacement character for a UTF-8 character split across tokens."""
from __future__ import annotations

import pytest

from bitnet_py.detokenizer import IncrementalDetokenizer
from conftest import load_reference
from test_tokenizer import ALL_CASES, tokenizer_for


def stream(detok: IncrementalDetokenizer, ids) -> list[str]:
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("model,kind", ALL_CASES)
def test_streamed_generation_equals_reference_text(model, kind):
    tok = tokenizer_for(model, kind)
    for r in load_reference(model, kind)["results"]:
        expected = bytes.fromhex(r["gen_text_hex"]).decode("utf-8", errors="replace")
        assert expected == r["gen_text"]
        chunks = stream(IncrementalDetokenizer(tok), r["gen_ids"])
        assert "".join(chunks) == expected
        # every prefix of the stream is a prefix of the final text: nothing emitted early is taken back,
        # so no half character ever went out as U+FFFD
        sofar = ""
        for c in chunks:
            sofar += c
            assert expected.startswith(sofar)


@pytest.mark.parametrize("model,kind", ALL_CASES)
def test_streamed_prompt_reproduces_prompt_text(model, kind):
    # the prompts include accents, CJK and an emoji split into byte tokens (see prompt_pieces_hex)
    tok = tokenizer_for(model, kind)
    spm_prefix = " " if model == "tiny-bitnet" else ""  # SentencePiece adds "▁" before the text
    held_back = 0
    for r in load_reference(model, kind)["results"]:
        detok = IncrementalDetokenizer(tok, skip_special=True)
        out = []
        for i in r["prompt_ids"]:
            piece = detok.push(i)
            held_back += piece == "" and bool(detok.pending_bytes)
            assert "\ufffd" not in piece
            out.append(piece)
        out.append(detok.flush())
        expected = (spm_prefix + r["prompt"]) if r["prompt"] else ""
        assert "".join(out) == expected
    assert held_back > 0  # some token really was an incomplete character


def test_skip_special_and_flush_of_incomplete_character():
    tok = tokenizer_for("tiny-bitnet-b158", "hf")
    detok = IncrementalDetokenizer(tok, skip_special=True)
    assert detok.push(tok.bos_id) == ""
    detok_all = IncrementalDetokenizer(tok)
    assert detok_all.push(tok.bos_id) == "<|begin_of_text|>"
    # a lead byte alone (first byte of "Ü" in the reference pieces) stays pending, flush replaces it
    lead = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\xc3")
    assert detok.push(lead) == ""
    assert detok.pending_bytes == b"\xc3"
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""
