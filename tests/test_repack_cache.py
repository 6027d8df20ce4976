"""The TL2 repack cache (bitnet_py/repack_cache.py): written on the first load, mapped on the next, rebuilt
when the model file or tiling changes or the cache file is damaged, never fatal when it cannot be written."""
from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bitnet_py.weights as weights_module
from bitnet_py.model import Batch, Model
from bitnet_py.gguf.tl2_tiling import TL2Tile
from bitnet_py.repack_cache import HEADER_BYTES, MAGIC, RepackCache
from conftest import fixture_path


@pytest.fixture
def tl2_model(tmp_path, monkeypatch):
    """A copy of bitnet.cpp's tiny TL2 file (with its tiling beside it) and an enabled, empty cache folder."""
    model = tmp_path / "model" / "ggml-model-tl2.gguf"
    model.parent.mkdir()
    shutil.copy(fixture_path("tiny-bitnet", "ggml-model-tl2.gguf"), model)
    shutil.copy(fixture_path("tl2-kernel_config.ini"), model.parent / "kernel_config.ini")
    monkeypatch.setenv("BITNET_PY_REPACK_CACHE", "1")
    monkeypatch.setenv("BITNET_PY_CACHE", str(tmp_path / "cache"))
    return model


def cache_files(tmp_path):
    folder = tmp_path / "cache" / "repacked"
    return sorted(folder.iterdir()) if folder.exists() else []


def count_repacks(monkeypatch) -> list:
    calls = []
    real = weights_module.tl2_to_i2s_packed

    def counting(*args):
        calls.append(args[1:3])
        return real(*args)
    monkeypatch.setattr(weights_module, "tl2_to_i2s_packed", counting)
    return calls


def memory_owner(arr: np.ndarray):
    """The object that owns an array's memory (an mmap for mapped files), or None if the array owns it."""
    while isinstance(arr, (np.ndarray, memoryview)):
        arr = arr.base if isinstance(arr, np.ndarray) else arr.obj
    return arr


def ternary_bytes(model: Model) -> dict[str, bytes]:
    out = {}
    for i, layer in enumerate(model.weights.layers):
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            w = getattr(layer, name)
            out[f"{i}.{name}"] = (bytes(w.packed), float(w.scale))
    return out


def logits(model: Model) -> np.ndarray:
    kv = model.new_kv_cache(2, 16)
    T = 5
    batch = Batch(tokens=np.arange(1, T + 1, dtype=np.int32), positions=np.arange(T, dtype=np.int32),
                  seq_index=np.zeros(T, np.int32), block_tables=np.array([[0, 1]], np.int32),
                  logit_rows=np.arange(T, dtype=np.int32))
    return model.forward(batch, kv)


def test_second_load_maps_the_cache_and_computes_the_same(tl2_model, tmp_path, monkeypatch):
    repacks = count_repacks(monkeypatch)
    first = Model.load(str(tl2_model))
    assert len(repacks) == 14  # 2 layers x 7 ternary weights
    assert len(cache_files(tmp_path)) == 1
    repacks.clear()
    second = Model.load(str(tl2_model))
    assert repacks == []  # nothing decoded: every tensor came from the cache file
    assert (first.weights.tl2_source, second.weights.tl2_source) == ("decoded", "repack cache")
    assert isinstance(memory_owner(second.weights.layers[0].wq.packed), mmap.mmap)  # the mapped cache file
    own = memory_owner(first.weights.layers[0].wq.packed)  # the first load's own repacked copy: an array, or
    assert own is None or own is not memory_owner(second.weights.layers[0].wq.packed)  # base-3: an anonymous map
    for model in (first, second):  # one array type for every ternary weight: one set of compiled kernels
        assert not model.weights.layers[1].w_down.packed.flags.writeable
    monkeypatch.setenv("BITNET_PY_REPACK_CACHE", "0")
    fresh = Model.load(str(tl2_model))  # cache off: decoded again (exact vs bitnet.cpp: test_weight_types.py)
    assert ternary_bytes(second) == ternary_bytes(fresh) == ternary_bytes(first)
    np.testing.assert_array_equal(logits(second), logits(fresh))


def test_changed_model_file_is_repacked_and_replaces_the_old_cache(tl2_model, tmp_path, monkeypatch):
    Model.load(str(tl2_model))
    [old] = cache_files(tmp_path)
    st = os.stat(tl2_model)
    os.utime(tl2_model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was rewritten
    repacks = count_repacks(monkeypatch)
    Model.load(str(tl2_model))
    assert len(repacks) == 14
    [new] = cache_files(tmp_path)
    assert new != old


def test_cache_file_is_keyed_by_tiling(tl2_model):
    tile = TL2Tile(256, 256, 128, 96)
    a = RepackCache(tl2_model, {(256, 256): tile})
    b = RepackCache(tl2_model, {(256, 256): TL2Tile(256, 256, 64, 96)})
    assert a.path != b.path and a.path.parent == b.path.parent


@pytest.mark.parametrize("damage", ["truncate", "magic", "json", "table"])
def test_damaged_cache_is_ignored_and_rewritten(tl2_model, tmp_path, monkeypatch, caplog, damage):
    reference = ternary_bytes(Model.load(str(tl2_model)))
    [path] = cache_files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) - 5000]
    elif damage == "magic":
        data[:4] = b"XXXX"
    elif damage == "json":
        data[len(MAGIC):len(MAGIC) + 8] = b"{garbage"
    else:  # a matching key with a malformed tensor table
        header = json.loads(bytes(data[len(MAGIC):HEADER_BYTES]).rstrip(b"\0"))
        header["tensors"] = list(header["tensors"])
        data[len(MAGIC):HEADER_BYTES] = json.dumps(header).encode().ljust(HEADER_BYTES - len(MAGIC), b"\0")
    path.write_bytes(bytes(data))
    repacks = count_repacks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="bitnet_py.repack_cache"):
        model = Model.load(str(tl2_model))
    assert len(repacks) == 14
    assert "ignoring repack cache" in caplog.text
    assert ternary_bytes(model) == reference
    repacks.clear()
    assert ternary_bytes(Model.load(str(tl2_model))) == reference
    assert repacks == []  # the rewritten file is used


def test_unwritable_cache_folder_only_warns(tl2_model, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("BITNET_PY_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="bitnet_py.repack_cache"):
        model = Model.load(str(tl2_model))
    assert "repack cache not written" in caplog.text
    assert np.isfinite(logits(model)).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cache_can_be_turned_off(tl2_model, tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_PY_REPACK_CACHE", "0")
    Model.load(str(tl2_model))
    assert cache_files(tmp_path) == []


def test_dead_writers_temporary_files_are_removed(tl2_model, tmp_path):
    Model.load(str(tl2_model))
    [path] = cache_files(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dead_tmp = path.with_name(f"{path.name}.{dead}.tmp")
    live_tmp = path.with_name(f"{path.name}.{os.getppid()}.tmp")  # a running process: maybe still writing
    dead_tmp.write_bytes(b"partial")
    live_tmp.write_bytes(b"partial")
    st = os.stat(tl2_model)
    os.utime(tl2_model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # forces a new cache file to be written
    Model.load(str(tl2_model))
    names = {p.name for p in cache_files(tmp_path)}
    assert dead_tmp.name not in names and live_tmp.name in names
    assert sum(n.endswith(".i2s") for n in names) == 1


@pytest.fixture
def tq2_model(tmp_path, monkeypatch):
    """A TQ2_0 file our converter makes from the fixture's tiny-bitnet weights, and an enabled, empty cache."""
    from bitnet_py.convert import convert
    model = tmp_path / "model" / "tiny-bitnet-tq2_0.gguf"
    model.parent.mkdir()
    convert(str(fixture_path("tiny-bitnet", "hf")), "tq2_0", str(model), progress=False)
    monkeypatch.setenv("BITNET_PY_REPACK_CACHE", "1")
    monkeypatch.setenv("BITNET_PY_CACHE", str(tmp_path / "cache"))
    return model


def count_tq_unpacks(monkeypatch) -> list:
    """Records the packed size (rows x cols / 4) of every TQ2_0 tensor decoded at load."""
    calls = []
    real = weights_module.tq2_0_to_i2s_packed

    def counting(raw, n_blocks, out, scale_bits):
        calls.append(out.size)
        return real(raw, n_blocks, out, scale_bits)
    monkeypatch.setattr(weights_module, "tq2_0_to_i2s_packed", counting)
    return calls


def test_tq2_0_bytes_and_block_scales_come_from_the_cache(tq2_model, tmp_path, monkeypatch):
    unpacks = count_tq_unpacks(monkeypatch)
    first = Model.load(str(tq2_model))
    assert len(unpacks) == 14 and len(cache_files(tmp_path)) == 1
    unpacks.clear()
    second = Model.load(str(tq2_model))
    assert unpacks == []  # bytes and block scales both mapped from the cache file
    w1, w2 = first.weights.layers[1].w_down, second.weights.layers[1].w_down
    assert isinstance(memory_owner(w2.packed), mmap.mmap) and isinstance(memory_owner(w2.block_scales), mmap.mmap)
    assert w2.block_scales.dtype == np.float32 and w2.block_scales.shape == w1.block_scales.shape
    for w in (w1, w2):  # one array type for both loads: one set of compiled kernels
        assert not w.packed.flags.writeable and not w.block_scales.flags.writeable
    monkeypatch.setenv("BITNET_PY_REPACK_CACHE", "0")
    fresh = Model.load(str(tq2_model))
    for a, b in zip(second.weights.layers, fresh.weights.layers):
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            assert bytes(getattr(a, name).packed) == bytes(getattr(b, name).packed)
            np.testing.assert_array_equal(getattr(a, name).block_scales, getattr(b, name).block_scales)
    np.testing.assert_array_equal(logits(second), logits(fresh))


def test_tq2_0_cache_without_block_scales_is_a_miss(tq2_model, tmp_path, monkeypatch):
    Model.load(str(tq2_model))
    [path] = cache_files(tmp_path)
    data = bytearray(path.read_bytes())
    header = json.loads(bytes(data[len(MAGIC):HEADER_BYTES]).rstrip(b"\0"))
    del header["tensors"]["blk.0.attn_q.weight#block_scales"]
    data[len(MAGIC):HEADER_BYTES] = json.dumps(header).encode().ljust(HEADER_BYTES - len(MAGIC), b"\0")
    path.write_bytes(bytes(data))
    unpacks = count_tq_unpacks(monkeypatch)
    model = Model.load(str(tq2_model))
    assert unpacks == [256 * 256 // 4]  # that tensor (256 x 256) decoded again; the others mapped
    assert memory_owner(model.weights.layers[0].wq.packed) is None
    assert isinstance(memory_owner(model.weights.layers[0].wk.packed), mmap.mmap)


def test_screen_copy_cached_by_an_earlier_load_stays_in_the_file_map(tq2_model, tmp_path, monkeypatch):
    """A load without the screened head neither promotes nor copies (no_mmap) the head's int8 copy that a screened
    load cached (0.33 GB at 2B-4T: 1.46 x peak RSS for an all-logits TQ2_0 bench before), and a rewrite of the
    cache in that load keeps the copy's bytes."""
    from bitnet_py.gguf.reader import GGUFFile
    from bitnet_py.screened_head import CACHE_SUFFIXES
    Model.load(str(tq2_model), screen_head=True, promote=False)
    [path] = cache_files(tmp_path)
    data = path.read_bytes()
    table = json.loads(data[len(MAGIC):HEADER_BYTES].rstrip(b"\0"))["tensors"]
    screen = sorted((o, o + n) for name, (o, n) in table.items() if name.endswith(CACHE_SUFFIXES))
    assert len(screen) == 2
    asked = []
    monkeypatch.setattr(GGUFFile, "promote", lambda self, sparse=frozenset(), also=(): asked.append(list(also)))
    model = Model.load(str(tq2_model), screen_head=False)
    [[(cache_map, skip)]] = asked  # the cache map, without the screen copy's ranges
    assert cache_map is model.weights.repack_map and sorted(skip) == screen
    cache = RepackCache(tq2_model, {}, anonymous=True, unwanted=CACHE_SUFFIXES)  # as a no_mmap load opens it
    assert cache.hit and cache.file_map is None and cache.skip == []
    for name, (offset, nbytes) in table.items():
        assert bytes(cache.get(name, nbytes)) == data[offset:offset + nbytes]
    copy_owner = memory_owner(cache.get("blk.0.attn_q.weight", table["blk.0.attn_q.weight"][1]))
    screen_owners = {memory_owner(cache.get(n, table[n][1])) for n in table if n.endswith(CACHE_SUFFIXES)}
    assert copy_owner not in screen_owners  # the copy is in anonymous memory, the screen entries in the file map
    cache.put("extra#test", np.arange(10, dtype=np.uint8))  # a miss in that load: the file is rewritten
    cache.save()
    again = RepackCache(tq2_model, {})
    for name, (offset, nbytes) in table.items():
        assert bytes(again.get(name, nbytes)) == data[offset:offset + nbytes]
    assert bytes(again.get("extra#test", 10)) == bytes(range(10))
