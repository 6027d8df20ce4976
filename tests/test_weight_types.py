"""Other weight encodings of the same ternary model: TQ1_0, TQ2_0 (upstream ggml's ternary types) and
BF16 embeddings. The tiny-bitnet I2_S fixture is re-encoded tensor by tensor, so the ternary values are
bitnet.cpp's; the outputs must then match bitnet.cpp's I2_S reference within the quantized-file tolerance
(TQ types keep the scale per 256-block as f16 and quantize activations per 256 inputs (Q8_K, upstream's
arithmetic), which moves logits by rounding only)."""
import numpy as np
import pytest

from conftest import fixture_path, load_reference
from bitnet_py.generate import generate
from bitnet_py.gguf.constants import GGMLType
from bitnet_py.gguf.reader import GGUFFile
from bitnet_py.gguf.ternary_pack import pack_tq1_0, pack_tq2_0
from bitnet_py.gguf.ternary_unpack import unpack_i2s
from bitnet_py.gguf.writer import GGUFWriter
from bitnet_py.model import Model

NEAR_TIE = 0.1


def _reencode(tmp_path, ternary_type=None, embd_type=None):
    src = GGUFFile(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    out = tmp_path / f"re-{ternary_type}-{embd_type}.gguf"
    w = GGUFWriter(out)
    for k, v in src.metadata.items():
        w.add(k, v)
    data = {}
    for t in src.tensors.values():
        type_id, blob = t.type_id, src.raw(t.name)
        if t.type_id == GGMLType.I2_S and ternary_type is not None:
            m, k = t.np_shape
            codes, scale = unpack_i2s(blob, m, k)
            pack = pack_tq2_0 if ternary_type == GGMLType.TQ2_0 else pack_tq1_0
            type_id, blob = ternary_type, pack(codes, scale)
        elif t.name == "token_embd.weight" and embd_type == GGMLType.BF16:
            f32 = src.array(t.name).astype(np.float32)
            type_id, blob = GGMLType.BF16, (f32.view(np.uint32) >> 16).astype(np.uint16)  # exact: f16 values fit
        w.add_tensor_info(t.name, t.np_shape, type_id)
        data[t.name] = blob
    w.write_header()
    for name, blob in data.items():
        w.write_tensor(name, blob)
    w.close()
    return str(out)


@pytest.mark.parametrize("ternary_type", [GGMLType.TQ2_0, GGMLType.TQ1_0])
def test_tq_types_match_i2s_reference(tmp_path, ternary_type):
    model = Model.load(_reencode(tmp_path, ternary_type=ternary_type))
    assert model.weights.layers[0].wq.source_type == ternary_type.name
    ref = load_reference("tiny-bitnet", "i2_s")
    for r in ref["results"]:
        res = generate(model, r["prompt_ids"], 16, keep_logits=True)
        assert np.abs(res.step_logits[0] - np.array(r["last_prompt_logits"], np.float32)).max() < 0.5
        n = next((i for i, s in enumerate(r["steps"][:16]) if s["margin"] < NEAR_TIE), 16)
        assert res.ids[:n] == r["gen_ids"][:n]


def test_bf16_embedding_and_head(tmp_path):
    """BF16 embedding (also the tied head here): rows widen exactly; logits stay within bf16 noise of the
    reference (bf16 keeps 8 of f16's 11 significant bits)."""
    model = Model.load(_reencode(tmp_path, embd_type=GGMLType.BF16))
    src = GGUFFile(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    assert model.weights.token_embd.type_id == GGMLType.BF16 and model.weights.output.source_type == "BF16"
    emb = model.weights.output.f32
    expect = (src.array("token_embd.weight").astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    assert np.array_equal(emb, expect)
    for r in load_reference("tiny-bitnet", "i2_s")["results"][:4]:
        res = generate(model, r["prompt_ids"], 1, keep_logits=True)
        ref_logits = np.array(r["last_prompt_logits"], np.float32)
        assert np.corrcoef(res.step_logits[0], ref_logits)[0, 1] > 0.995
        assert np.median(np.abs(res.step_logits[0] - ref_logits)) < 0.15
