"""Ternary encoders: exact inverses of the decoders, byte-identical to bitnet.cpp's files and upstream gguf-py."""
from __future__ import annotations

import numpy as np
import pytest

from bitnet_py.convert_safetensors import Checkpoint
from bitnet_py.gguf.reader import GGUFFile
from bitnet_py.gguf.tl2_tiling import TL2Tile, default_tile, parse_kernel_config
from bitnet_py.gguf.ternary_pack import (absmean_dequant, i2s_nbytes, pack_i2s, pack_tl2, pack_tq1_0, pack_tq2_0,
                                         quantize_i2s_rule, ternarize_absmean, tl2_nbytes, torch_f32_sum)
from bitnet_py.gguf.ternary_unpack import unpack_i2s, unpack_tl2, unpack_tq1_0, unpack_tq2_0
from bitnet_py.gguf.reader import tensor_nbytes
from bitnet_py.gguf.constants import GGMLType
from conftest import fixture_path

SHAPES = [(32, 128), (128, 256), (256, 256), (768, 256), (256, 768), (512, 256), (256, 512), (96, 384),
          (640, 2560), (64, 1024)]
TERNARY = [f"blk.{i}.{n}.weight" for i in (0, 1) for n in
           ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]


def _random_ternary(rng, m, k, p_zero=0.35):
    w = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(m, k), p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2])
    return w


@pytest.mark.parametrize("m,k", SHAPES)
def test_i2s_round_trip(m, k):
    rng = np.random.default_rng(m * 7 + k)
    w = _random_ternary(rng, m, k)
    raw = pack_i2s(w, np.float32(0.0625))
    assert raw.dtype == np.uint8 and raw.size == i2s_nbytes(m, k) == tensor_nbytes(GGMLType.I2_S, (k, m))
    back, scale = unpack_i2s(raw, m, k)
    assert np.array_equal(back, w) and scale == np.float32(0.0625)
    assert not raw[m * k // 4 + 4:].any()  # the 28 undefined tail bytes are written as zeros


@pytest.mark.parametrize("m,k,bk", [(m, k, bk) for m, k in SHAPES for bk in (96, 192) if k >= bk])
def test_tl2_round_trip(m, k, bk):
    rng = np.random.default_rng(m + 3 * k + bk)
    w = _random_ternary(rng, m, k)
    tile = TL2Tile(m, k, default_tile(m, k).bm, bk)
    if (k - k // bk * bk) % 32:
        with pytest.raises(ValueError):
            pack_tl2(w, 1.5, tile)
        return
    raw = pack_tl2(w, np.float32(1.5), tile)
    assert raw.size == tl2_nbytes(m, k) == tensor_nbytes(GGMLType.TL2, (k, m))
    back, scale = unpack_tl2(raw, m, k, tile)
    assert np.array_equal(back, w) and scale == np.float32(1.5)


@pytest.mark.parametrize("m,k", [(8, 256), (32, 512), (3, 1024)])
def test_tq_round_trip_and_upstream_bytes(m, k):
    gguf_quants = pytest.importorskip("gguf.quants")
    import gguf
    rng = np.random.default_rng(k + m)
    w = _random_ternary(rng, m, k, p_zero=0.2)
    w.reshape(-1, 256)[:, 0] = 1  # every block has a nonzero, so upstream's block max equals the scale
    scale = np.float32(0.375)
    for pack, unpack, qtype in ((pack_tq2_0, unpack_tq2_0, gguf.GGMLQuantizationType.TQ2_0),
                                (pack_tq1_0, unpack_tq1_0, gguf.GGMLQuantizationType.TQ1_0)):
        raw = pack(w, scale)
        back, d = unpack(raw, m, k)
        assert np.array_equal(back, w) and np.all(d == scale)
        upstream = gguf_quants.quantize((w * scale).astype(np.float32), qtype).reshape(-1)
        assert np.array_equal(raw, upstream), qtype.name


def test_tq_per_block_scales():
    rng = np.random.default_rng(5)
    w = _random_ternary(rng, 4, 512)
    scales = np.array([[0.5, 0.25]] * 4, dtype=np.float32)
    _, d = unpack_tq2_0(pack_tq2_0(w, scales), 4, 512)
    assert np.array_equal(d, scales)



@pytest.mark.parametrize("m,k", [(3, 256), (5, 1024)])
def test_tq2_0_bytes_straight_to_i2s_match_the_int8_path(m, k):
    """The load path's table conversion of TQ2_0 bytes equals decoding to int8 and packing as I2_S, scales
    included; every byte value goes through the table once (code 3 included: it is mapped, not checked)."""
    from kernels.tl2_repack import pack_i2s, tq2_0_to_i2s_packed
    rng = np.random.default_rng(m * k)
    scales = (rng.random((m, k // 256)) + 0.1).astype(np.float32)
    raw = pack_tq2_0(_random_ternary(rng, m, k), scales)
    blocks = raw.reshape(-1, 66)
    blocks[0, :64] = np.arange(64, dtype=np.uint8) * 4 + 1  # more byte values, codes 0..3
    blocks[-1, :64] = np.arange(192, 256, dtype=np.uint8)
    w, d = unpack_tq2_0(raw, m, k)
    expected = np.empty(m * k // 4, np.uint8)
    pack_i2s(np.ascontiguousarray(w), expected)
    packed, bits = np.empty(m * k // 4, np.uint8), np.empty(m * k // 256, np.uint16)
    tq2_0_to_i2s_packed(raw, m * k // 256, packed, bits)
    assert np.array_equal(packed, expected)
    assert np.array_equal(bits.view(np.float16).astype(np.float32).reshape(m, -1), d)


def test_bad_shapes_raise():
    w = np.zeros((32, 100), np.int8)
    with pytest.raises(ValueError):
        pack_i2s(w, 1.0)
    with pytest.raises(ValueError):
        pack_tq2_0(w, 1.0)
    with pytest.raises(ValueError):
        pack_tl2(np.zeros((48, 256), np.int8), 1.0, TL2Tile(48, 256, 32, 96))


def test_quantize_i2s_rule():
    w = np.array([[0.5, -0.5, 0.0, 1e-7, -2e-6, 0.3] + [0.0] * 122], dtype=np.float32)
    codes, scale = quantize_i2s_rule(w)
    assert scale == np.float32(0.5)
    assert codes[0, :6].tolist() == [1, -1, 0, 0, -1, 1]
    # C compares (double)|w| < 1e-6: float32(1e-6) is just below 1e-6 (-> 0), the next float above it (-> 1)
    edge = np.float32(1e-6)
    w2 = np.array([[edge, np.nextafter(edge, np.float32(1)), -edge] + [0.0] * 125], dtype=np.float32)
    assert quantize_i2s_rule(w2)[0][0, :3].tolist() == [0, 1, 0]


def test_torch_sum_small_cases_exact():
    # below one vector the sum is sequential; the result must equal the f32 sequential sum
    x = np.array([1e8, 1.0, -1e8, 1.0, 0.5], dtype=np.float32)
    acc = np.float32(0)
    for v in x:
        acc = np.float32(acc + v)
    assert torch_f32_sum(x) == acc
    y = np.arange(1, 100001, dtype=np.float32)  # exact in float64; f32 cascade stays close
    assert abs(float(torch_f32_sum(y)) - 5000050000.0) / 5000050000.0 < 1e-6


@pytest.mark.parametrize("model", ["tiny-bitnet", "tiny-llama"])
def test_fixture_ternary_tensors_byte_identical(model):
    tiles = parse_kernel_config(fixture_path("tl2-kernel_config.ini"))
    f32 = GGUFFile(fixture_path(model, "ggml-model-f32.gguf"))
    i2s = GGUFFile(fixture_path(model, "ggml-model-i2_s.gguf"))
    tl2 = GGUFFile(fixture_path(model, "ggml-model-tl2.gguf"))
    for name in TERNARY:
        w = f32.array(name)
        m, k = w.shape
        codes, scale = quantize_i2s_rule(w)
        mine = pack_i2s(codes, scale)
        ref = i2s.raw(name)
        assert np.array_equal(mine[:m * k // 4 + 4], ref[:m * k // 4 + 4]), name
        assert np.array_equal(pack_tl2(codes, scale, tiles[(m, k)]), tl2.raw(name)), name


def test_absmean_matches_bitnet_cpp_converter():
    """bitnet.cpp's converter ternarized tiny-bitnet's bf16 weights with torch; our float32 result is
    bit-identical, including the torch summation order of the mean and -0.0 entries."""
    f32 = GGUFFile(fixture_path("tiny-bitnet", "ggml-model-f32.gguf"))
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
    with Checkpoint(str(fixture_path("tiny-bitnet", "hf"))) as ckpt:
        for name in TERNARY:
            layer, kind = name.split(".")[1], name.split(".")[2]
            w = ckpt.load_f32(f"model.layers.{layer}.{hf_names[kind]}.weight")
            ref = f32.array(name)
            assert np.array_equal(absmean_dequant(w).view(np.uint32), ref.view(np.uint32)), name
            codes, scale = ternarize_absmean(w)
            assert np.array_equal(codes, np.sign(ref).astype(np.int8))
            assert scale == np.abs(ref).max()
