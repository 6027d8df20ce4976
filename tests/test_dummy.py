"""Random-weight model generator: tiny layout files load, decode, re-encode to the same bytes; big layouts are
checked by their tensor plans only (no large files in CI)."""
from __future__ import annotations

import filecmp

import numpy as np
import pytest

from bitnet_py.dummy import LAYOUTS, TYPES, main, make_dummy, tensor_plan
from bitnet_py.dummy_vocab import synthetic_bpe, synthetic_sentencepiece
from bitnet_py.gguf.constants import GGMLType, Keys, TokenType
from bitnet_py.gguf.reader import GGUFFile
from bitnet_py.gguf.ternary_pack import pack_i2s, pack_tl2, pack_tq2_0
from bitnet_py.gguf.ternary_unpack import unpack_i2s, unpack_tl2, unpack_tq2_0
from bitnet_py.gguf.tl2_tiling import tiling_from_metadata


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dummy")
    return {t: GGUFFile(make_dummy("tiny", t, str(root / f"tiny-{t}.gguf"), seed=3, progress=False)) for t in TYPES}


@pytest.mark.parametrize("qtype", list(TYPES))
def test_tiny_file_loads_and_round_trips(tiny_files, qtype):
    g = tiny_files[qtype]
    a = g.architecture
    assert a == "bitnet-b1.58" and g.metadata[f"{a}.embedding_length"] == 256
    assert g.metadata[Keys.FILE_TYPE] == TYPES[qtype][2]
    assert len(g.metadata[Keys.TOKENS]) == g.metadata[f"{a}.vocab_size"] == 2048
    assert len(g.tensors) == 2 * 11 + 2 and "output.weight" not in g.tensors
    tiles = tiling_from_metadata(g.metadata[Keys.TL2_TILING]) if qtype == "tl2" else {}
    ttype = TYPES[qtype][0]
    for name, t in g.tensors.items():
        if name.endswith("norm.weight"):
            v = g.array(name)
            assert t.type_id == GGMLType.F32 and np.all(v > 0) and 0.5 < v.mean() < 1.5
            continue
        if name == "token_embd.weight":
            e = g.array(name).astype(np.float32)
            assert 0.015 < e.std() < 0.025
            continue
        assert t.type_id == ttype, name
        m, k = t.np_shape
        raw = g.raw(name)
        if ttype == GGMLType.I2_S:
            codes, scale = unpack_i2s(raw, m, k)
            assert np.array_equal(pack_i2s(codes, scale), raw)
        elif ttype == GGMLType.TL2:
            codes, scale = unpack_tl2(raw, m, k, tiles[(m, k)])
            assert np.array_equal(pack_tl2(codes, scale, tiles[(m, k)]), raw)
        elif ttype == GGMLType.TQ2_0:
            codes, d = unpack_tq2_0(raw, m, k)
            scale = d[0, 0]
            assert np.all(d == scale) and np.array_equal(pack_tq2_0(codes, d), raw)
        else:
            w = g.array(name).astype(np.float32)
            scale = np.abs(w).max()
            codes = np.sign(w).astype(np.int8)
            assert np.array_equal(np.abs(w)[codes != 0], np.full((codes != 0).sum(), scale))
        frac = np.bincount(codes.reshape(-1) + 1, minlength=3) / codes.size
        assert np.all(np.abs(frac - 1 / 3) < 0.02), (name, frac)
        assert 0.8 * np.sqrt(1.5 / k) <= scale <= 1.2 * np.sqrt(1.5 / k) * 1.001, name


def test_seed_determinism(tmp_path):
    a = make_dummy("tiny", "i2_s", str(tmp_path / "a.gguf"), seed=11, progress=False)
    b = make_dummy("tiny", "i2_s", str(tmp_path / "b.gguf"), seed=11, progress=False)
    c = make_dummy("tiny", "i2_s", str(tmp_path / "c.gguf"), seed=12, progress=False)
    assert filecmp.cmp(a, b, shallow=False) and not filecmp.cmp(a, c, shallow=False)


def test_tiny_vocab_is_a_usable_tokenizer(tiny_files):
    from bitnet_py.tokenizer import Tokenizer
    g = tiny_files["i2_s"]
    tok = Tokenizer.from_gguf_metadata(g.metadata)
    text = "Hello, wörld! 123 🙂\n\tend"
    ids = tok.encode(text)
    assert ids[0] == g.metadata[Keys.BOS_ID] == 2038
    assert b"".join(tok.token_bytes(i) for i in ids[1:]) == text.encode("utf-8")
    assert g.metadata[Keys.TOKENS][2038:2040] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert g.metadata[Keys.TOKENS][g.metadata[Keys.EOT_ID]] == "<|eot_id|>"


def test_synthetic_vocabularies_valid():
    meta = synthetic_bpe(5000, 0, None)
    tokens, merges = meta[Keys.TOKENS], meta[Keys.MERGES]
    assert len(tokens) == len(set(tokens)) == 5000 and len(merges) == 5000 - 10 - 256
    index = {t: i for i, t in enumerate(tokens)}
    for rank, m in enumerate(merges):  # every merge joins two earlier tokens into the token it creates
        left, right = m.split(" ")
        assert max(index[left], index[right]) < 256 + rank and index[left + right] == 256 + rank
    spm = synthetic_sentencepiece(4000, 0)
    assert len(spm[Keys.TOKENS]) == len(set(spm[Keys.TOKENS])) == 4000
    assert spm[Keys.TOKENS][3] == "<0x00>" and spm[Keys.TOKEN_TYPE][3] == TokenType.BYTE
    assert np.all(np.diff(spm[Keys.SCORES][259:]) < 0)


@pytest.mark.parametrize("layout,ternary_params,n_tensors", [
    ("2b-4t", 30 * (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 6912 * 2560), 30 * 11 + 2),
    ("2b-4t-upstream", 30 * (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 6912 * 2560), 30 * 11 + 2),
    ("bitnet-large", 24 * (4 * 1536 * 1536 + 3 * 4096 * 1536), 24 * 11 + 2),
    ("bitnet-3b", 26 * (4 * 3200 * 3200 + 3 * 8640 * 3200), 26 * 11 + 2),
    ("falcon3-1b", 18 * (2 * 2048 * 2048 + 2 * 1024 * 2048 + 3 * 8192 * 2048), 18 * 9 + 3),
    ("falcon3-7b", 28 * (2 * 3072 * 3072 + 2 * 1024 * 3072 + 3 * 23040 * 3072), 28 * 9 + 3),
    ("llama3-8b", 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096), 32 * 9 + 3),
])
def test_big_layout_plans(layout, ternary_params, n_tensors):
    plan = tensor_plan(LAYOUTS[layout])
    assert len(plan) == n_tensors
    assert sum(int(np.prod(s)) for _, s, r in plan if r == "ternary") == ternary_params


def test_unsupported_combination_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["--layout", "bitnet-3b", "--type", "i2_s", "-o", str(out), "--no-progress"]) == 1
    assert "K % 128" in capsys.readouterr().err and not out.exists()
