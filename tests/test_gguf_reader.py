"""GGUF reader: parses bitnet.cpp's files zero-copy and refuses broken files with a clear GGUFError."""
import struct

import numpy as np
import pytest

from conftest import fixture_path
from bitnet_py.gguf.constants import GGMLType
from bitnet_py.gguf.reader import GGUFError, GGUFFile, tensor_nbytes
from bitnet_py.gguf.writer import GGUFWriter


def _write_small(path, type_id=GGMLType.F32, shape=(4, 128), extra=None):
    w = GGUFWriter(path)
    w.add("general.architecture", "llama")
    w.add("general.name", "small")
    for k, v in (extra or {}).items():
        w.add(k, v)
    w.add_tensor_info("a.weight", shape, type_id)
    w.add_tensor_info("b.weight", (16,), GGMLType.F32)
    w.write_header()
    n = tensor_nbytes(type_id, tuple(reversed(shape)))
    w.write_tensor("a.weight", np.arange(n, dtype=np.uint8))
    w.write_tensor("b.weight", np.ones(16, np.float32))
    w.close()
    return path


def _tensor_info_pos(data: bytes, name: str) -> int:
    """Byte position just after the tensor's name in the tensor table."""
    enc = name.encode()
    pos = data.index(struct.pack("<Q", len(enc)) + enc)
    return pos + 8 + len(enc)


def test_reads_bitnetcpp_files_zero_copy():
    f = GGUFFile(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    assert f.version == 3 and f.architecture == "bitnet" and len(f.tensors) == 24
    assert f.metadata["tokenizer.ggml.model"] == "llama" and len(f.metadata["tokenizer.ggml.tokens"]) == 2048
    q = f.info("blk.0.attn_q.weight")
    assert q.type_id == GGMLType.I2_S and q.shape == (256, 256) and q.nbytes == 256 * 256 // 4 + 32
    emb = f.array("token_embd.weight")
    assert emb.dtype == np.float16 and emb.shape == (2048, 256)
    assert not emb.flags.owndata and np.shares_memory(emb, f.raw("token_embd.weight"))
    tl2 = GGUFFile(fixture_path("tiny-bitnet", "ggml-model-tl2.gguf"))
    assert tl2.info("blk.0.ffn_down.weight").nbytes == 43744  # ggml_nbytes of TL2 [768 x 256]


def test_read_rows_equal_the_mapped_rows_and_refuse_bad_ids(tmp_path):
    """Rows read from the file (pread) equal the mapped ones, in the order asked, repeats included; ids outside the
    tensor and rows past a truncated file's end are errors, not crashes."""
    import shutil
    f = GGUFFile(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    for name in ("token_embd.weight", "output_norm.weight"):
        raw = f.raw(name)
        rows = raw.reshape(f.info(name).np_shape[0], -1)
        ids = [0, 5, 5, len(rows) - 1, 3] if len(rows) > 5 else [0, len(rows) - 1, 0]
        assert np.array_equal(f.read_rows(name, np.array(ids)), rows[ids])
        assert f.read_rows(name, np.array([], np.int64)).shape == (0, rows.shape[1])
    with pytest.raises(IndexError):
        f.read_rows("token_embd.weight", [2048])
    with pytest.raises(IndexError):
        f.read_rows("token_embd.weight", [-1])
    path = tmp_path / "m.gguf"
    shutil.copy(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"), path)
    g = GGUFFile(path)
    emb = g.info("token_embd.weight")
    row_bytes = emb.nbytes // 2048
    with open(path, "r+b") as fh:  # the file shrinks under the open reader: the last rows are gone
        fh.truncate(emb.offset + 100 * row_bytes)
    assert np.array_equal(g.read_rows("token_embd.weight", [99]), f.read_rows("token_embd.weight", [99]))
    with pytest.raises(GGUFError, match="short read"):
        g.read_rows("token_embd.weight", [100])
    g.close()
    with pytest.raises(GGUFError, match="after close"):  # no reads from a descriptor number reused since
        g.read_rows("token_embd.weight", [1])


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 4)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(p)
    (tmp_path / "tiny").write_bytes(b"GG")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(tmp_path / "tiny")
    with pytest.raises(GGUFError, match="no such model file"):
        GGUFFile(tmp_path / "missing.gguf")


@pytest.mark.parametrize("cut", [30, 200, 400, 700, -100])
def test_truncated_files(tmp_path, cut):
    data = fixture_path("tiny-llama", "ggml-model-i2_s.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(GGUFError, match="truncated|past the end"):
        GGUFFile(p)


def test_corrupted_header_fields(tmp_path):
    good = _write_small(tmp_path / "good.gguf").read_bytes()
    cases = {
        "version": (good[:4] + struct.pack("<I", 99) + good[8:], "unsupported GGUF version 99"),
        "tensor count": (good[:8] + struct.pack("<Q", 1 << 40) + good[16:], "absurd header counts"),
        "string length": (good[:24] + struct.pack("<Q", 1 << 50) + good[32:], "absurd string length|truncated"),
    }
    for what, (data, msg) in cases.items():
        p = tmp_path / f"{what}.gguf"
        p.write_bytes(data)
        with pytest.raises(GGUFError, match=msg):
            GGUFFile(p)


def test_lying_tensor_offsets_and_dims(tmp_path):
    good = _write_small(tmp_path / "good.gguf").read_bytes()
    pos = _tensor_info_pos(good, "a.weight")  # n_dims u32, dims u64 x2, type u32, offset u64
    off_pos = pos + 4 + 16 + 4
    bad = bytearray(good)
    bad[off_pos:off_pos + 8] = struct.pack("<Q", 1 << 30)  # beyond the end of the file
    (tmp_path / "off.gguf").write_bytes(bad)
    with pytest.raises(GGUFError, match="a.weight.*past the end"):
        GGUFFile(tmp_path / "off.gguf")
    bad = bytearray(good)
    bad[off_pos:off_pos + 8] = struct.pack("<Q", 3)  # misaligned
    (tmp_path / "align.gguf").write_bytes(bad)
    with pytest.raises(GGUFError, match="not aligned"):
        GGUFFile(tmp_path / "align.gguf")
    bad = bytearray(good)
    bad[pos + 4:pos + 12] = struct.pack("<Q", 1 << 45)  # absurd dimension: must fail before any allocation
    (tmp_path / "dims.gguf").write_bytes(bad)
    with pytest.raises(GGUFError, match="absurd shape"):
        GGUFFile(tmp_path / "dims.gguf")
    bad = bytearray(good)
    bad[pos:pos + 4] = struct.pack("<I", 9)  # nine dimensions
    (tmp_path / "ndims.gguf").write_bytes(bad)
    with pytest.raises(GGUFError, match="9 dimensions"):
        GGUFFile(tmp_path / "ndims.gguf")


def test_unknown_tensor_type_is_named(tmp_path):
    good = _write_small(tmp_path / "good.gguf").read_bytes()
    type_pos = _tensor_info_pos(good, "a.weight") + 4 + 16
    bad = bytearray(good)
    bad[type_pos:type_pos + 4] = struct.pack("<I", 77)
    (tmp_path / "type.gguf").write_bytes(bad)
    with pytest.raises(GGUFError, match="a.weight.*unknown type 77"):
        GGUFFile(tmp_path / "type.gguf")


def test_metadata_value_types_round_trip(tmp_path):
    extra = {"x.u": 7, "x.f": 0.5, "x.b": True, "x.s": "héllo", "x.arr": [1, 2, 3], "x.strs": ["a", "", "ü"]}
    f = GGUFFile(_write_small(tmp_path / "m.gguf", extra=extra))
    assert f.metadata["x.u"] == 7 and f.metadata["x.f"] == 0.5 and f.metadata["x.b"] is True
    assert f.metadata["x.s"] == "héllo" and list(f.metadata["x.arr"]) == [1, 2, 3]
    assert f.metadata["x.strs"] == ["a", "", "ü"]
    assert f.get("{arch}.missing", 5) == 5
