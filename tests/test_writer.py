"""Streaming GGUF writer: read back with GGUFFile, and byte-identical copies of bitnet.cpp's files."""
from __future__ import annotations

import filecmp

import numpy as np
import pytest

from bitnet_py.gguf.constants import GGMLType, GGUFValueType, Keys
from bitnet_py.gguf.reader import GGUFFile
from bitnet_py.gguf.ternary_pack import pack_i2s
from bitnet_py.gguf.ternary_unpack import unpack_i2s
from bitnet_py.gguf.writer import GGUFWriteError, GGUFWriter
from conftest import fixture_path


def test_metadata_all_types_round_trip(tmp_path):
    path = tmp_path / "meta.gguf"
    w = GGUFWriter(path)
    w.add("general.architecture", "bitnet")
    w.add("t.u8", 7, GGUFValueType.UINT8)
    w.add("t.i8", -7, GGUFValueType.INT8)
    w.add("t.u16", 65535, GGUFValueType.UINT16)
    w.add("t.i16", -300, GGUFValueType.INT16)
    w.add("t.u32", 4000000000)
    w.add("t.i32", -5)
    w.add("t.u64", 1 << 40)
    w.add("t.i64", -(1 << 40))
    w.add("t.f32", 1e-5)
    w.add("t.f64", 0.1, GGUFValueType.FLOAT64)
    w.add("t.bool", True)
    w.add("t.str", "héllo ▁ 🙂")
    w.add("t.strs", ["a", "", "Ġ t", "<0x0A>"])
    w.add("t.ints", [1, -2, 3])
    w.add("t.floats", [0.5, -1.25])
    w.add("t.np_f32", np.array([1.5, 2.5], dtype=np.float32))
    w.add("t.np_u32", np.arange(8, dtype=np.uint32))
    w.add("t.np_i64", np.array([-1, 2], dtype=np.int64))
    w.add("t.bools", [True, False, True])
    w.add("t.nested", [[1, 2], [3]])
    w.add("t.u8arr", [1, 2, 255], GGUFValueType.ARRAY, GGUFValueType.UINT8)
    w.close()
    g = GGUFFile(path)
    m = g.metadata
    assert m["t.u8"] == 7 and m["t.i8"] == -7 and m["t.u16"] == 65535 and m["t.i16"] == -300
    assert m["t.u32"] == 4000000000 and m["t.i32"] == -5 and m["t.u64"] == 1 << 40 and m["t.i64"] == -(1 << 40)
    assert m["t.f32"] == float(np.float32(1e-5)) and m["t.f64"] == 0.1 and m["t.bool"] is True
    assert m["t.str"] == "héllo ▁ 🙂" and m["t.strs"] == ["a", "", "Ġ t", "<0x0A>"]
    assert m["t.ints"].dtype == np.int32 and m["t.ints"].tolist() == [1, -2, 3]
    assert m["t.floats"].dtype == np.float32 and m["t.floats"].tolist() == [0.5, -1.25]
    assert m["t.np_f32"].tolist() == [1.5, 2.5] and m["t.np_u32"].dtype == np.uint32
    assert m["t.np_i64"].tolist() == [-1, 2] and m["t.bools"].tolist() == [True, False, True]
    assert [a.tolist() for a in m["t.nested"]] == [[1, 2], [3]]
    assert m["t.u8arr"].dtype == np.uint8 and m["t.u8arr"].tolist() == [1, 2, 255]
    assert g.tensors == {}


def test_tensors_round_trip_and_alignment(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)  # 60 bytes: forces padding
    b = rng.standard_normal((7,)).astype(np.float16)
    codes = rng.integers(-1, 2, (64, 256)).astype(np.int8)
    for align in (32, 64):
        path = tmp_path / f"t{align}.gguf"
        with GGUFWriter(path, alignment=align) as w:
            w.add(Keys.ARCHITECTURE, "llama")
            w.add_tensor_info("a", a.shape, GGMLType.F32)
            w.add_tensor_info("b", b.shape, GGMLType.F16)
            w.add_tensor_info("q", codes.shape, GGMLType.I2_S)
            w.write_header()
            w.write_tensor("a", a)
            w.write_tensor("b", b.tobytes())
            w.write_tensor("q", pack_i2s(codes, np.float32(0.7)))
        g = GGUFFile(path)
        assert g.alignment == align and g.data_offset % align == 0
        assert all((t.offset - g.data_offset) % align == 0 for t in g.tensors.values())
        assert g.tensors["a"].shape == (5, 3) and np.array_equal(g.array("a"), a)
        assert np.array_equal(g.array("b"), b)
        back, scale = unpack_i2s(g.raw("q"), 64, 256)
        assert np.array_equal(back, codes) and scale == np.float32(0.7)
        assert (Keys.ALIGNMENT in g.metadata) == (align != 32)


def test_writer_errors(tmp_path):
    w = GGUFWriter(tmp_path / "e.gguf")
    w.add_tensor_info("x", (4,), GGMLType.F32)
    with pytest.raises(GGUFWriteError):
        w.add_tensor_info("x", (4,), GGMLType.F32)
    with pytest.raises(GGUFWriteError):
        w.add("k", object())
    w.add_tensor_info("y", (2,), GGMLType.F32)
    w.write_header()
    with pytest.raises(GGUFWriteError):
        w.add("late", 1)
    with pytest.raises(GGUFWriteError):
        w.write_tensor("y", np.zeros(2, np.float32))  # out of order
    with pytest.raises(GGUFWriteError):
        w.write_tensor("x", np.zeros(3, np.float32))  # wrong size
    w.write_tensor("x", np.zeros(4, np.float32))
    with pytest.raises(GGUFWriteError):
        w.close()  # y missing
    with pytest.raises(GGUFWriteError):
        GGUFWriter(tmp_path / "bad.gguf", alignment=24)
    with pytest.raises(GGUFWriteError):
        with GGUFWriter(tmp_path / "aborted.gguf") as w2:
            w2.add_tensor_info("z", (2,), GGMLType.F32)
            w2.write_tensor("z", np.zeros(3, np.float32))
    assert not (tmp_path / "aborted.gguf").exists()


@pytest.mark.parametrize("name", ["tiny-bitnet/ggml-model-f32.gguf", "tiny-bitnet/ggml-model-i2_s.gguf",
                                  "tiny-bitnet/ggml-model-tl2.gguf", "tiny-llama/ggml-model-f32.gguf",
                                  "tiny-llama/ggml-model-tl2.gguf"])
def test_copy_of_fixture_is_byte_identical(tmp_path, name):
    """Re-writing a bitnet.cpp file from its parsed metadata and raw tensor regions gives the same bytes:
    same value types, key order, tensor table, offsets and padding."""
    src = GGUFFile(fixture_path(*name.split("/")))
    out = tmp_path / "copy.gguf"
    w = GGUFWriter(out)
    for k, v in src.metadata.items():
        w.add(k, v)
    for t in src.tensors.values():
        w.add_tensor_info(t.name, t.np_shape, t.type_id)
    w.write_header()
    for t in src.tensors.values():
        w.write_tensor(t.name, src.raw(t.name))
    w.close()
    assert filecmp.cmp(out, src.path, shallow=False)


def test_write_tensor_parts(tmp_path):
    data = np.arange(1000, dtype=np.float32)
    path = tmp_path / "parts.gguf"
    with GGUFWriter(path) as w:
        w.add_tensor_info("big", data.shape, GGMLType.F32)
        w.add_tensor_info("after", (3,), GGMLType.F32)
        w.write_header()
        w.write_tensor_parts("big", (data[i:i + 300] for i in range(0, 1000, 300)))
        w.write_tensor("after", np.ones(3, np.float32))
    g = GGUFFile(path)
    assert np.array_equal(g.array("big"), data) and g.array("after").tolist() == [1, 1, 1]
    w = GGUFWriter(tmp_path / "short.gguf")
    w.add_tensor_info("big", data.shape, GGMLType.F32)
    w.write_header()
    with pytest.raises(GGUFWriteError):
        w.write_tensor_parts("big", [data[:10]])
    with pytest.raises(GGUFWriteError):
        w.close()
    assert not (tmp_path / "short.gguf").exists()
