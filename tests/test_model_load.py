"""Model loading: clear errors naming what is wrong; TL2 tiling resolution; the generate CLI."""
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, fixture_path, load_reference
from bitnet_py.gguf.reader import GGUFError
from bitnet_py.model import Model


def _patched_copy(tmp_path, src, old: bytes, new: bytes, name="patched.gguf"):
    assert len(old) == len(new)
    data = src.read_bytes()
    assert old in data
    p = tmp_path / name
    p.write_bytes(data.replace(old, new, 1))
    return p


def test_unknown_architecture_is_named(tmp_path):
    p = _patched_copy(tmp_path, fixture_path("tiny-llama", "ggml-model-i2_s.gguf"), b"\x05\x00\x00\x00\x00\x00\x00\x00llama",
                      b"\x05\x00\x00\x00\x00\x00\x00\x00llamb")
    with pytest.raises(GGUFError, match="unsupported architecture 'llamb'"):
        Model.load(str(p))


def test_missing_tensor_is_named(tmp_path):
    p = _patched_copy(tmp_path, fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"), b"blk.1.ffn_up.weight",
                      b"blk.1.ffn_zz.weight")
    with pytest.raises(GGUFError, match="missing tensor blk.1.ffn_up.weight"):
        Model.load(str(p))


def test_unsupported_tensor_type_is_named(tmp_path):
    src = fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")
    data = bytearray(src.read_bytes())
    name = b"blk.0.attn_q.weight"
    pos = data.index(name) + len(name) + 4 + 16  # n_dims u32, 2 dims u64, then the type id
    assert data[pos:pos + 4] == (36).to_bytes(4, "little")
    data[pos:pos + 4] = (38).to_bytes(4, "little")  # TL1: ARM-only format, not supported
    p = tmp_path / "tl1.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="blk.0.attn_q.weight.*TL1"):
        Model.load(str(p))


def test_tl2_without_known_tiling_says_what_to_pass(tmp_path):
    p = tmp_path / "m.gguf"
    shutil.copy(fixture_path("tiny-bitnet", "ggml-model-tl2.gguf"), p)
    with pytest.raises(ValueError, match="--tl2-config"):
        Model.load(str(p))
    shutil.copy(fixture_path("tl2-kernel_config.ini"), tmp_path / "kernel_config.ini")  # beside the model: found
    assert Model.load(str(p)).weights.layers[0].wq.source_type == "TL2"


def test_tl2_tiling_mismatch_is_not_silently_accepted(tmp_path):
    """A wrong tiling decodes different weights; the decoded model must then disagree with the I2_S one."""
    import numpy as np
    ini = (tmp_path / "kernel_config.ini")
    ini.write_text(fixture_path("tl2-kernel_config.ini").read_text().replace("bm = 128", "bm = 64", 1))
    shutil.copy(fixture_path("tiny-bitnet", "ggml-model-tl2.gguf"), tmp_path / "m.gguf")
    wrong = Model.load(str(tmp_path / "m.gguf"))
    right = Model.load(str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")))
    assert not np.array_equal(wrong.weights.layers[0].wq.packed, right.weights.layers[0].wq.packed)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bitnet_py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("memory", [[], ["--no-mmap"], ["--no-screen-head"], ["--keep-file-map"]])
def test_cli_generate_matches_reference_text(memory):
    ref = load_reference("tiny-llama", "i2_s")["results"][0]
    r = _cli("generate", "-m", str(fixture_path("tiny-llama", "ggml-model-i2_s.gguf")), "-p", ref["prompt"],
             "-n", "16", "--temp", "0", "-t", "1", *memory)
    assert r.returncode == 0, r.stderr
    from bitnet_py.tokenizer import Tokenizer
    from bitnet_py.gguf.reader import GGUFFile
    tok = Tokenizer.from_gguf_metadata(GGUFFile(fixture_path("tiny-llama", "ggml-model-i2_s.gguf")).metadata)
    ids = ref["gen_ids"][:16]
    if any(i in tok.stop_ids for i in ids):
        ids = ids[:min(ids.index(i) for i in ids if i in tok.stop_ids)]
    assert r.stdout.rstrip("\n") == tok.decode(ids, skip_special=True)
    assert "prompt" in r.stderr and "tok/s" in r.stderr and "load" in r.stderr


def test_cli_generate_promotes_only_chat_sessions():
    from bitnet_py.cli_generate import build_parser, promotes
    for flags, expected in (([], False), (["-cnv"], True), (["-cnv", "--keep-file-map"], False),
                            (["--keep-file-map"], False)):
        assert promotes(build_parser().parse_args(["-m", "x.gguf", *flags])) is expected, flags


@pytest.mark.parametrize("args,msg", [
    (["-m", "/no/such/model.gguf", "-p", "x"], "no such file"),
    (["-m", "README.md", "-p", "x"], "not a GGUF file"),
    (["-m", "README.md", "-n", "-3"], "-n must be"),
])
def test_cli_errors_are_one_line(args, msg):
    r = _cli("generate", *args)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr


def test_cli_unknown_command():
    r = _cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_q8_0_embedding_and_head_load_and_agree(tmp_path):
    """bitnet.cpp's quantizer gives Q8_0 embeddings/heads when the hidden size is not a multiple of 256
    (bitnet_b1_58-3B); such files load, and their logits stay within Q8_0 noise of the F16 file's reference."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from bitnet_py.generate import generate
    from bitnet_py.gguf.constants import GGMLType
    from bitnet_py.gguf.reader import GGUFFile
    from bitnet_py.gguf.writer import GGUFWriter
    src = GGUFFile(fixture_path("tiny-llama", "ggml-model-i2_s.gguf"))
    out = tmp_path / "q8.gguf"
    w = GGUFWriter(out)
    for k, v in src.metadata.items():
        w.add(k, v)
    data = {}
    for t in src.tensors.values():
        if t.name in ("token_embd.weight", "output.weight"):
            data[t.name] = quantize(src.array(t.name).astype(np.float32), GGMLQuantizationType.Q8_0)
            w.add_tensor_info(t.name, t.np_shape, GGMLType.Q8_0)
        else:
            data[t.name] = src.raw(t.name)
            w.add_tensor_info(t.name, t.np_shape, t.type_id)
    w.write_header()
    for name, d in data.items():
        w.write_tensor(name, d)
    w.close()
    model = Model.load(str(out))
    assert model.weights.output.source_type == "Q8_0"
    ref = load_reference("tiny-llama", "i2_s")
    for r in ref["results"][:4]:
        res = generate(model, r["prompt_ids"], 1, keep_logits=True)
        ref_logits = np.array(r["last_prompt_logits"], np.float32)
        diff = np.abs(res.step_logits[0] - ref_logits)
        assert np.median(diff) < 0.15 and diff.max() < 1.0, (np.median(diff), diff.max())
        assert np.corrcoef(res.step_logits[0], ref_logits)[0, 1] > 0.995
        if r["steps"][0]["margin"] > 0.5:
            assert res.ids[0] == r["gen_ids"][0]


@pytest.mark.parametrize("b3", [False, True])
def test_i2s_weights_are_zero_copy_views_of_the_file(b3, monkeypatch):
    # in I2_S's own layout the weights are the file's bytes; repacked to the base-3 layout (hosts with VBMI) they
    # are read-only copies outside the file map
    import numpy as np
    import bitnet_py.weights as weights
    if b3 and not weights.b3_enabled():
        pytest.skip("the base-3 layout needs AVX-512 VBMI + VNNI (kernels.b3_simd.HAVE_B3)")
    monkeypatch.setattr(weights, "use_b3", lambda m, k: b3)
    monkeypatch.setattr(weights, "b3_enabled", lambda: b3)
    model = Model.load(str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")))
    f = model.gguf
    for L in model.weights.layers:
        for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down):
            assert not w.packed.flags.owndata and not w.packed.flags.writeable
            assert np.shares_memory(w.packed, f._data) == (not b3)
            assert w.layout == ("b3" if b3 else "i2_s")
