"""HF -> GGUF converter: tensors byte-identical to bitnet.cpp's files, tokenizer metadata equal, bitnet-b1.58."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bitnet_py.convert import convert, main
from bitnet_py.convert_arch import permute_qk, unpack_hf_ternary
from bitnet_py.convert_safetensors import Checkpoint
from bitnet_py.gguf.constants import GGMLType, Keys, TokenType
from bitnet_py.gguf.reader import GGUFFile
from bitnet_py.gguf.ternary_unpack import unpack_i2s, unpack_tl2
from bitnet_py.gguf.tl2_tiling import default_tile, tiling_from_metadata
from conftest import fixture_path

# keys that legitimately differ from bitnet.cpp's files (documented in bitnet_py/convert.py)
OWN_KEYS = {Keys.TL2_TILING}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert each fixture model once per outtype (cached for the module)."""
    cache: dict[tuple[str, str], GGUFFile] = {}
    root = tmp_path_factory.mktemp("conv")

    def get(model: str, outtype: str) -> GGUFFile:
        if (model, outtype) not in cache:
            out = root / f"{model}-{outtype}.gguf"
            convert(str(fixture_path(model, "hf")), outtype, str(out),
                    tl2_config=str(fixture_path("tl2-kernel_config.ini")), progress=False)
            cache[(model, outtype)] = GGUFFile(out)
        return cache[(model, outtype)]
    return get


def _assert_same_tensor(mine: GGUFFile, ref: GGUFFile, name: str) -> None:
    a, b = mine.info(name), ref.info(name)
    assert (a.shape, a.type_id, a.nbytes) == (b.shape, b.type_id, b.nbytes), name
    ra, rb = mine.raw(name), ref.raw(name)
    if a.type_id == GGMLType.I2_S:  # the 28 bytes after the scale are undefined in bitnet.cpp's files
        n = int(np.prod(a.shape)) // 4 + 4
        assert np.array_equal(ra[:n], rb[:n]), name
        assert not ra[n:].any()
    else:
        assert np.array_equal(ra, rb), name


# ---- tiny-bitnet-b158 (arch bitnet-b1.58): the lead's parity test consumes these files ------------------
@pytest.mark.parametrize("outtype", ["f32", "i2_s"])
def test_b158_conversion(converted, outtype):
    g = converted("tiny-bitnet-b158", outtype)
    a = "bitnet-b1.58"
    expect = {Keys.ARCHITECTURE: a, f"{a}.block_count": 2, f"{a}.context_length": 2048,
              f"{a}.embedding_length": 256, f"{a}.feed_forward_length": 768, f"{a}.attention.head_count": 4,
              f"{a}.attention.head_count_kv": 1, f"{a}.rope.freq_base": 500000.0, f"{a}.vocab_size": 2048,
              f"{a}.attention.layer_norm_rms_epsilon": float(np.float32(1e-5)), f"{a}.rope.dimension_count": 64,
              Keys.TOKENIZER_MODEL: "gpt2", Keys.TOKENIZER_PRE: "llama-bpe", Keys.BOS_ID: 2045, Keys.EOS_ID: 2046,
              Keys.EOT_ID: 2047, Keys.ADD_BOS: True,
              Keys.FILE_TYPE: {"f32": 0, "i2_s": 40}[outtype]}
    for k, v in expect.items():
        assert g.metadata[k] == v, k
    hf_cfg = json.loads(fixture_path("tiny-bitnet-b158", "hf", "tokenizer_config.json").read_text())
    assert g.metadata[Keys.CHAT_TEMPLATE] == hf_cfg["chat_template"]
    assert g.metadata[Keys.TOKEN_TYPE][2045:].tolist() == [TokenType.CONTROL] * 3
    assert len(g.metadata[Keys.MERGES]) == 1789 and len(g.metadata[Keys.TOKENS]) == 2048
    assert "output.weight" not in g.tensors and len(g.tensors) == 24
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                  "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
    with Checkpoint(str(fixture_path("tiny-bitnet-b158", "hf"))) as ck:
        emb = ck.load_f32("model.embed_tokens.weight")
        got = g.array("token_embd.weight")
        assert np.array_equal(got, emb.astype(got.dtype))
        assert np.array_equal(g.array("output_norm.weight"), ck.load_f32("model.norm.weight"))
        for layer in (0, 1):
            for hf, gg in hf_to_gguf.items():
                w = ck.load_f32(f"model.layers.{layer}.{hf}.weight")
                name = f"blk.{layer}.{gg}.weight"
                if w.ndim == 1:
                    assert np.array_equal(g.array(name), w), name
                    continue
                # WeightQuant in float64 as an independent reference: codes and 1/s (to float32 rounding)
                s = 1.0 / max(np.abs(w.astype(np.float64)).mean(), 1e-5)
                ref_codes = np.clip(np.round(w.astype(np.float64) * s), -1, 1)
                if outtype == "f32":
                    t = g.array(name)
                    scale = np.abs(t).max()
                    assert np.array_equal(np.sign(t), ref_codes), name
                else:
                    codes, scale = unpack_i2s(g.raw(name), *w.shape)
                    assert np.array_equal(codes, ref_codes), name
                assert abs(float(scale) * s - 1) < 1e-6, name


# ---- tiny-bitnet / tiny-llama against bitnet.cpp's files -----------------------------------------------
@pytest.mark.parametrize("model", ["tiny-bitnet", "tiny-llama"])
@pytest.mark.parametrize("outtype", ["f32", "i2_s", "tl2"])
def test_tensors_byte_identical_to_bitnet_cpp(converted, model, outtype):
    mine = converted(model, outtype)
    ref = GGUFFile(fixture_path(model, f"ggml-model-{outtype}.gguf"))
    assert list(mine.tensors) == list(ref.tensors)  # same order too
    for name in ref.tensors:
        _assert_same_tensor(mine, ref, name)


@pytest.mark.parametrize("model", ["tiny-bitnet", "tiny-llama"])
@pytest.mark.parametrize("outtype", ["f32", "i2_s", "tl2"])
def test_metadata_equal_to_bitnet_cpp(converted, model, outtype):
    mine = converted(model, outtype)
    ref = GGUFFile(fixture_path(model, f"ggml-model-{outtype}.gguf"))
    assert [k for k in mine.metadata if k not in OWN_KEYS] == list(ref.metadata)  # same keys, same order
    for k, v in ref.metadata.items():
        got = mine.metadata[k]
        if isinstance(v, np.ndarray):
            assert got.dtype == v.dtype and np.array_equal(got, v), k
        else:
            assert got == v, k


def test_tl2_records_tiling(converted):
    g = converted("tiny-bitnet", "tl2")
    tiles = tiling_from_metadata(g.metadata[Keys.TL2_TILING])
    assert tiles[(256, 256)].bm == 128 and tiles[(128, 256)].bm == 64 and tiles[(256, 768)].bk == 96
    for name, t in g.tensors.items():
        if t.type_id == GGMLType.TL2:
            m, k = t.np_shape
            codes, _ = unpack_tl2(g.raw(name), m, k, tiles[(m, k)])
            assert set(np.unique(codes)) <= {-1, 0, 1}


def test_tl2_without_config_uses_default_tiles(tmp_path):
    out = tmp_path / "d.gguf"
    convert(str(fixture_path("tiny-llama", "hf")), "tl2", str(out), progress=False)
    g = GGUFFile(out)
    ref = GGUFFile(fixture_path("tiny-llama", "ggml-model-f32.gguf"))
    tiles = tiling_from_metadata(g.metadata[Keys.TL2_TILING])
    for (m, k), t in tiles.items():
        assert t == default_tile(m, k)
    codes, scale = unpack_tl2(g.raw("blk.1.ffn_down.weight"), 256, 512, tiles[(256, 512)])
    w = ref.array("blk.1.ffn_down.weight")
    assert np.array_equal(codes, np.sign(w)) and scale == np.abs(w).max()


def test_tq2_0_output(tmp_path):
    out = tmp_path / "tq.gguf"
    convert(str(fixture_path("tiny-llama", "hf")), "tq2_0", str(out), progress=False)
    g = GGUFFile(out)
    ref = GGUFFile(fixture_path("tiny-llama", "ggml-model-f32.gguf"))
    assert g.metadata[Keys.FILE_TYPE] == 37
    from bitnet_py.gguf.ternary_unpack import unpack_tq2_0
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        w = ref.array(name)
        codes, d = unpack_tq2_0(g.raw(name), *w.shape)
        assert np.array_equal(codes, np.sign(w))
        assert np.allclose(d, np.float16(np.abs(w).max()))


def test_permute_and_unpack_helpers():
    w = np.arange(8 * 3).reshape(8, 3)
    p = permute_qk(w, 2)  # 2 heads of 4 rows: rows (0,2,1,3) within each head
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    rng = np.random.default_rng(0)
    t = rng.integers(-1, 2, (12, 5)).astype(np.int8)
    u = (t + 1).astype(np.uint8).reshape(4, 3, 5)  # row i*3 + p lives in packed row p, bits 2i
    packed = u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)
    assert np.array_equal(unpack_hf_ternary(packed, 12), t)
    assert np.array_equal(unpack_hf_ternary(packed, 10), t[:10])


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path), "--outtype", "f32", "-o", str(tmp_path / "x.gguf"), "--no-progress"]) == 1
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--outtype", "q4_0"])


def _write_packed_checkpoint(src_model: str, dst, converted_ref: GGUFFile) -> None:
    """A transformers-style offline-quantized copy of a fixture model: ternary linears as uint8 [M/4, K]
    (4 values per byte, value+1 in bits 2i of packed row p for row i*M/4 + p) plus weight_scale = 1/alpha."""
    import shutil
    from safetensors.numpy import save_file
    src = fixture_path(src_model, "hf")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    kinds = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    tensors = {}
    with Checkpoint(str(src)) as ck:
        for hf in ck.names():
            w = ck.load_f32(hf)
            short = hf.split(".")[-2]
            if short in kinds:
                name = f"blk.{hf.split('.')[2]}.{kinds[short]}.weight"
                codes, alpha = unpack_i2s(converted_ref.raw(name), *w.shape)  # HF row order for bitnet archs
                if short in ("q_proj", "k_proj") and src_model == "tiny-llama":
                    codes = np.sign(w).astype(np.int8)
                    alpha = np.abs(w).max()
                u = (codes + 1).astype(np.uint8).reshape(4, w.shape[0] // 4, w.shape[1])
                tensors[hf] = u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)
                tensors[hf[:-len("weight")] + "weight_scale"] = np.array([1.0 / alpha], dtype=np.float32)
            else:
                tensors[hf] = w
    save_file(tensors, str(dst / "model.safetensors"))


@pytest.mark.parametrize("model", ["tiny-bitnet-b158", "tiny-llama"])
def test_packed_uint8_checkpoint(converted, tmp_path, model):
    ref = converted(model, "i2_s")
    _write_packed_checkpoint(model, tmp_path, ref)
    out = tmp_path / "packed.gguf"
    convert(str(tmp_path), "i2_s", str(out), progress=False)
    g = GGUFFile(out)
    assert list(g.tensors) == list(ref.tensors)
    for name, t in ref.tensors.items():
        if t.type_id == GGMLType.I2_S:
            m, k = t.np_shape
            c1, s1 = unpack_i2s(g.raw(name), m, k)
            c2, s2 = unpack_i2s(ref.raw(name), m, k)
            assert np.array_equal(c1, c2), name  # includes the llama q/k permutation
            assert abs(float(s1) / float(s2) - 1) < 1e-6, name


def test_sentencepiece_parser_matches_sentencepiece_package():
    spm = pytest.importorskip("sentencepiece")
    from bitnet_py.convert_vocab import read_sentencepiece
    path = str(fixture_path("tiny-bitnet", "hf", "tokenizer.model"))
    pieces, scores, types = read_sentencepiece(path)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert np.array_equal(scores, np.array([sp.get_score(i) for i in range(len(pieces))], np.float32))
    for i, t in enumerate(types):
        kind = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                else TokenType.BYTE if sp.is_byte(i) else TokenType.UNUSED if sp.is_unused(i) else TokenType.NORMAL)
        assert t == kind, i


def test_progress_bar_path(tmp_path, capsys):
    out = convert(str(fixture_path("tiny-bitnet-b158", "hf")), "i2_s", str(tmp_path / "p.gguf"), progress=True)
    assert "convert" in capsys.readouterr().err
    assert GGUFFile(out).metadata[Keys.FILE_TYPE] == 40
