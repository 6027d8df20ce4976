"""bitnet_py.huge_pages: the KV cache, and the model copied by --no-mmap, in memory advised to use huge pages."""
import shutil

import numpy as np
import pytest

from bitnet_py.huge_pages import (copy_to_anonymous, huge_page_bytes, huge_pages_mode, huge_pages_possible,
                                  smaps_fields)
from bitnet_py.gguf.constants import GGMLType
from bitnet_py.gguf.reader import GGUFFile
from bitnet_py.model import Batch, Model
from bitnet_py.sampling import TopRequest
from conftest import fixture_path

I2S = ("tiny-bitnet", "ggml-model-i2_s.gguf")  # tied f16 embedding: the head's rows are also the embedding's


def _logits(model, tokens=(1, 50, 300, 7, 1000, 42), heads=None):
    tokens = np.array(tokens, np.int32)
    T = len(tokens)
    kv = model.new_kv_cache(1, 16)
    batch = Batch(tokens, np.arange(T, dtype=np.int32), np.zeros(T, np.int32), np.zeros((1, 1), np.int32),
                  np.arange(T, dtype=np.int32))
    return model.forward(batch, kv, heads)


def _smaps(view: np.ndarray) -> dict[str, list[str]]:
    """The /proc/self/smaps fields of the mapping that holds view."""
    fields = smaps_fields(view)
    assert fields, "mapping not found"
    return fields


def _vm_flags(view: np.ndarray) -> list[str]:
    return _smaps(view)["VmFlags"]


def _rss(view: np.ndarray) -> int:
    """Bytes of the pages under view that are in this process's page tables (/proc/self/pagemap's present bit):
    the view's own, where smaps' Rss covers its whole mapping, which the kernel may have merged with a neighbour."""
    import mmap
    import struct
    page = mmap.PAGESIZE
    first, last = view.ctypes.data // page, (view.ctypes.data + view.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", f.read(8 * (last - first + 1)))
    return sum(page for e in entries if e >> 63)


def test_copy_holds_the_file_and_outlives_changes_to_it(tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(fixture_path(*I2S), path)
    mapped, copied = GGUFFile(path), GGUFFile(path, no_mmap=True)
    assert mapped.mapped and not copied.mapped
    assert copied.tensors == mapped.tensors and list(copied.metadata) == list(mapped.metadata)
    before = {name: mapped.raw(name).copy() for name in mapped.tensors}
    for name in mapped.tensors:
        assert np.array_equal(copied.raw(name), before[name])
        assert not copied.raw(name).flags.writeable
    with open(path, "r+b") as f:  # overwrite every tensor byte: a map would show the change, the copy must not
        f.seek(mapped.data_offset)
        f.write(b"\0" * (mapped.file_size - mapped.data_offset))
    assert not all(np.array_equal(mapped.raw(name), before[name]) for name in mapped.tensors)
    for name in mapped.tensors:
        assert np.array_equal(copied.raw(name), before[name])


def test_copy_is_advised_huge_pages_where_the_host_has_them():
    copied = GGUFFile(fixture_path(*I2S), no_mmap=True)
    flags = _vm_flags(copied._data)
    assert ("hg" in flags) == huge_pages_possible(), flags  # MADV_HUGEPAGE shows as "hg"
    assert "hg" not in _vm_flags(GGUFFile(fixture_path(*I2S))._data)
    assert huge_page_bytes(copied._data) is not None


def test_huge_pages_mode_reads_the_kernel_setting(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert huge_pages_mode(str(setting)) == "madvise"
    setting.write_text("[always] madvise never\n")
    assert huge_pages_mode(str(setting)) == "always"
    assert huge_pages_mode(str(tmp_path / "missing")) == ""


def test_copy_releases_the_file_maps_pages_as_it_goes():
    # the file's pages leave the resident set as they are copied: the process never holds both copies
    import mmap
    with open(fixture_path(*I2S), "rb") as f:
        src = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(src, np.uint8)
    want = data.copy()  # touches every page of the map
    assert _rss(data) >= len(src) // mmap.PAGESIZE * mmap.PAGESIZE
    dst = copy_to_anonymous(src, len(src))
    assert np.array_equal(np.frombuffer(dst, np.uint8), want)
    assert _rss(data) <= mmap.PAGESIZE  # at most the partial last page


def test_copy_skips_whole_pages_of_the_ranges_asked():
    import mmap
    page = mmap.PAGESIZE
    src = mmap.mmap(-1, 10 * page)
    data = np.frombuffer(src, np.uint8)
    data[:] = np.arange(data.size) % 251 + 1
    skip = [(page + 100, 4 * page + 5), (6 * page, 7 * page)]  # pages 2-3 and 6 lie wholly inside
    dst = np.frombuffer(copy_to_anonymous(src, len(src), skip), np.uint8)
    holes = np.zeros(data.size, bool)
    holes[2 * page:4 * page] = holes[6 * page:7 * page] = True
    assert _rss(dst) <= 7 * page  # the holes were never touched (reading them below maps the zero page)
    assert np.array_equal(dst[~holes], data[~holes]) and not dst[holes].any()


def test_sparse_tensors_stay_in_the_file_map():
    mapped, copied = GGUFFile(fixture_path(*I2S)), GGUFFile(fixture_path(*I2S))
    copied.copy_to_anonymous(sparse={"token_embd.weight", "no.such.tensor"})
    embd = copied.raw("token_embd.weight")
    assert not copied.mapped and not np.shares_memory(embd, copied._data)
    for name in mapped.tensors:
        assert np.array_equal(copied.raw(name), mapped.raw(name))
    assert _rss(copied._data) <= copied.file_size - embd.nbytes + 2 * 4096  # the embedding was not copied


@pytest.mark.parametrize("head_type,screen_head,head_copied", [("f16", True, False), ("int8", False, False),
                                                               ("f16", False, True)])
def test_model_from_a_copy_computes_the_same_logits(head_type, screen_head, head_copied):
    # a head read whole every step is copied; one with an int8 copy (screened or int8 head), like the token
    # embedding, is read a few rows at a time from the file map, and releasing its pages after quantizing them
    # must not free rows the tied embedding still reads
    mapped = Model.load(str(fixture_path(*I2S)), head_type=head_type, screen_head=screen_head)
    copied = Model.load(str(fixture_path(*I2S)), head_type=head_type, screen_head=screen_head, no_mmap=True)
    assert mapped.gguf.mapped and not copied.gguf.mapped
    for L in copied.weights.layers:  # used from the copy, or (base-3 hosts) repacked from the file map at load
        assert np.shares_memory(L.wq.packed, copied.gguf._data) == (L.wq.layout == "i2_s")
    if copied.weights.layers[0].wq.layout == "b3":  # the I2_S bytes it was repacked from were not copied
        ternary = sum(t.nbytes for t in copied.gguf.tensors.values() if t.type_id == GGMLType.I2_S)
        assert _rss(copied.gguf._data) <= copied.gguf.file_size - ternary + 64 * 4096
    head = copied.gguf.raw("token_embd.weight")  # tied: the head's f16 rows
    assert np.shares_memory(head, copied.gguf._data) == head_copied
    assert np.array_equal(_logits(copied), _logits(mapped))
    heads = [TopRequest(1)] * 6
    assert np.array_equal(_logits(copied, heads=heads), _logits(mapped, heads=heads))


def _tl2_file_with_repack_cache(tmp_path, monkeypatch):
    """The tiny TL2 model (and its kernel_config.ini) in tmp_path, with the repack cache on, kept in tmp_path."""
    monkeypatch.setenv("BITNET_PY_REPACK_CACHE", "1")
    monkeypatch.setenv("BITNET_PY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    shutil.copy(fixture_path("tiny-bitnet", "ggml-model-tl2.gguf"), path)
    shutil.copy(fixture_path("tl2-kernel_config.ini"), tmp_path / "kernel_config.ini")
    return path


def test_tl2_model_from_a_copy_computes_the_same_logits(tmp_path, monkeypatch):
    path = _tl2_file_with_repack_cache(tmp_path, monkeypatch)
    mapped = Model.load(str(path))  # decodes TL2 and writes the repack cache
    copied = Model.load(str(path), no_mmap=True)  # a cache hit: the repacked bytes copied as well
    assert mapped.weights.tl2_source == "decoded" and copied.weights.tl2_source == "repack cache"
    # TL2 tensors are read once (decoded at a cache miss) from the file map, not copied; the other tensors are
    tl2 = [n for n, t in copied.gguf.tensors.items() if t.type_name == "TL2"]
    assert tl2 and not any(np.shares_memory(copied.gguf.raw(n), copied.gguf._data) for n in tl2)
    assert any(np.shares_memory(copied.gguf.raw(n), copied.gguf._data) for n in copied.gguf.tensors)
    packed = copied.weights.layers[0].wq.packed
    assert "hg" in _vm_flags(packed) or not huge_pages_possible()
    assert np.array_equal(_logits(copied), _logits(mapped))
    monkeypatch.setenv("BITNET_PY_CACHE", str(tmp_path / "empty"))  # a miss: decoded from the copy
    decoded = Model.load(str(path), no_mmap=True)
    assert decoded.weights.tl2_source == "decoded"
    assert np.array_equal(_logits(decoded), _logits(mapped))


def test_a_copy_larger_than_the_available_memory_falls_back_to_the_map(monkeypatch, caplog):
    from bitnet_py import huge_pages
    monkeypatch.setattr(huge_pages, "available_memory", lambda: 1000)
    with caplog.at_level("WARNING"):
        f = GGUFFile(fixture_path(*I2S), no_mmap=True)
    assert f.mapped and "larger than the memory available" in caplog.text
    assert np.array_equal(f.raw("token_embd.weight"), GGUFFile(fixture_path(*I2S)).raw("token_embd.weight"))


def test_available_memory_reads_memavailable(tmp_path):
    from bitnet_py.huge_pages import available_memory
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683520 kB\nMemFree:        21490148 kB\nMemAvailable:   23631452 kB\n")
    assert available_memory(str(meminfo)) == 23631452 * 1024
    meminfo.write_text("MemTotal:       24683520 kB\n")
    assert available_memory(str(meminfo)) is None
    assert available_memory(str(tmp_path / "missing")) is None
    assert available_memory() is None or available_memory() > 0


def _cgroup_files(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cgroup_headroom_reads_v2_and_v1_limits_and_their_ancestors(tmp_path):
    from bitnet_py.huge_pages import cgroup_headroom, fits_in_memory
    root, proc = tmp_path / "cgroup", tmp_path / "proc-cgroup"
    # v2: the pod's limit (3 GB, 1 GB charged of which 0.4 GB page cache) and a looser one on its parent
    _cgroup_files(root / "kubepods" / "pod1", {"memory.max": "3000000000\n", "memory.current": "1000000000\n",
                                               "memory.stat": "anon 600000000\nfile 400000000\n"})
    _cgroup_files(root / "kubepods", {"memory.max": "max\n", "memory.current": "5000000000\n"})
    proc.write_text("0::/kubepods/pod1\n")
    assert cgroup_headroom(str(proc), str(root)) == 3_000_000_000 - 1_000_000_000 + 400_000_000
    _cgroup_files(root / "kubepods", {"memory.max": "2500000000\n", "memory.current": "2000000000\n",
                                      "memory.stat": "file 100000000\n"})
    assert cgroup_headroom(str(proc), str(root)) == 600_000_000  # the parent's limit is the tighter one
    # v1 (this project's dev VM has a v1 memory controller without a limit): 2^63 rounded to a page means none
    v1 = root / "memory" / "process_api" / "x"
    _cgroup_files(v1, {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "2701185024\n"})
    proc.write_text("4:memory:/process_api/x\n3:cpuset:/\n0::/\n")
    assert cgroup_headroom(str(proc), str(root)) is None
    _cgroup_files(v1, {"memory.limit_in_bytes": "2000000000\n", "memory.usage_in_bytes": "1500000000\n",
                       "memory.stat": "cache 300000000\ntotal_cache 500000000\n"})
    assert cgroup_headroom(str(proc), str(root)) == 1_000_000_000
    assert cgroup_headroom(str(tmp_path / "missing"), str(root)) is None
    room = cgroup_headroom()
    assert room is None or room >= 0
    assert fits_in_memory(1) and not fits_in_memory(1 << 60)


def test_a_copy_larger_than_the_cgroup_limit_falls_back_to_the_map(monkeypatch, caplog):
    from bitnet_py import huge_pages
    monkeypatch.setattr(huge_pages, "cgroup_headroom", lambda: 1000)
    with caplog.at_level("WARNING"):
        f = GGUFFile(fixture_path(*I2S), no_mmap=True)
    assert f.mapped and "larger than the memory available" in caplog.text


@pytest.mark.parametrize("cache_type", ["f16", "f32"])
def test_kv_cache_is_zeroed_writable_memory_advised_huge_pages(cache_type):
    model = Model.load(str(fixture_path(*I2S)), cache_type=cache_type)
    kv = model.new_kv_cache(64, 16)
    for a in (kv.k, kv.v):
        assert a.flags.writeable and a.flags.c_contiguous and not a.any()
        assert ("hg" in _vm_flags(a)) == huge_pages_possible()
    assert not np.shares_memory(kv.k, kv.v)
    kv.k[1, :, 17] = 5  # layer 1, slot 17, every KV head ([L, KVH, n_slots, D])
    assert kv.k.sum() == 5 * kv.k.shape[1] * kv.k.shape[-1] and not kv.v.any()


def test_a_repack_cache_too_large_for_memory_stays_mapped(tmp_path, monkeypatch):
    from bitnet_py import huge_pages
    path = _tl2_file_with_repack_cache(tmp_path, monkeypatch)
    mapped = Model.load(str(path))  # writes the repack cache
    answers = iter([1 << 40, 1000])  # room for the GGUF copy, none left for the cache's
    monkeypatch.setattr(huge_pages, "available_memory", lambda: next(answers))
    fallback = Model.load(str(path), no_mmap=True)
    assert not fallback.gguf.mapped and fallback.weights.tl2_source == "repack cache"
    assert "hg" not in _vm_flags(fallback.weights.layers[0].wq.packed)
    assert np.array_equal(_logits(fallback), _logits(mapped))
