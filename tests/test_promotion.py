"""bitnet_py.promotion: a mapped file's bytes moved into anonymous huge pages at the same addresses, while other
threads read them."""
import dataclasses
import logging
import mmap
import threading
import time

import numpy as np
import pytest

from bitnet_py import promotion
from bitnet_py.gguf.reader import GGUFFile
from bitnet_py.huge_pages import huge_page_bytes_in, smaps_fields, smaps_mappings
from bitnet_py.model import Batch, Model
from bitnet_py.promotion import HUGE_PAGE, promote, promotion_possible, stretches
from bitnet_py.sampling import TopRequest
from conftest import fixture_path, load_reference

needs_promotion = pytest.mark.skipif(not promotion_possible(), reason="needs Linux with transparent huge pages "
                                     "offered (always or madvise)")
F32 = ("tiny-llama", "ggml-model-f32.gguf")  # 9 MB, every tensor streamed: several stretches to promote


def test_stretches_are_the_aligned_huge_pages_inside_the_range_that_touch_no_skip_range():
    base = 5 * HUGE_PAGE + 4096  # an unaligned map: its first whole huge page starts at 6 * HUGE_PAGE
    size = 4 * HUGE_PAGE
    assert stretches(base, size) == [6 * HUGE_PAGE, 7 * HUGE_PAGE, 8 * HUGE_PAGE]
    assert stretches(6 * HUGE_PAGE, 2 * HUGE_PAGE) == [6 * HUGE_PAGE, 7 * HUGE_PAGE]
    skip = [(HUGE_PAGE, HUGE_PAGE + 1)]  # offset HUGE_PAGE = address 6 * HUGE_PAGE + 4096: inside the first one
    assert stretches(base, size, skip) == [7 * HUGE_PAGE, 8 * HUGE_PAGE]
    edge = [(3 * HUGE_PAGE - 4096, 3 * HUGE_PAGE - 4096)]  # empty range on a boundary touches nothing
    assert stretches(base, size, edge) == [6 * HUGE_PAGE, 7 * HUGE_PAGE, 8 * HUGE_PAGE]
    assert stretches(base, HUGE_PAGE) == []


def _mapped_file(tmp_path, n_bytes: int, seed: int = 0):
    data = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return data, m, np.frombuffer(m, np.uint8)


def _anonymous_bytes(view: np.ndarray, offset: int) -> int:
    """Anonymous bytes of the mapping that holds the byte at offset of view (0: the file's page-cache pages)."""
    return int(smaps_fields(view[offset:offset + 1])["Anonymous"][0]) * 1024


@needs_promotion
def test_promotion_moves_the_same_bytes_into_huge_pages_and_leaves_skipped_ones_mapped(tmp_path):
    data, m, view = _mapped_file(tmp_path, 9 * HUGE_PAGE + 12345)
    address = view.ctypes.data
    skip = [(4 * HUGE_PAGE + 7, 4 * HUGE_PAGE + 99)]
    expected = stretches(address, view.nbytes, skip)
    assert len(expected) >= 6
    job = promote([(view, skip)])
    assert job.wait(60) and job.error is None
    assert job.promoted_bytes == len(expected) * HUGE_PAGE
    assert np.array_equal(view, data)  # same addresses, same bytes
    assert not view.flags.writeable
    for start in expected:
        fields = smaps_fields(view[start - address:start - address + 1])
        assert int(fields["Anonymous"][0]) == int(fields["Rss"][0]) > 0
        assert "hg" in fields["VmFlags"]  # advised huge pages
    skipped = (address + skip[0][0]) // HUGE_PAGE * HUGE_PAGE
    assert skipped not in expected
    assert _anonymous_bytes(view, skipped - address) == 0  # still the file's page-cache pages
    assert huge_page_bytes_in(address, view.nbytes) is not None
    del view
    m.close()  # a finished promotion holds no view: the map can go


@needs_promotion
def test_readers_see_the_files_bytes_throughout_a_promotion(tmp_path, monkeypatch):
    data, m, view = _mapped_file(tmp_path, 48 * HUGE_PAGE, seed=1)
    words = view.view(np.uint64)
    expected = np.bitwise_xor.reduce(data.view(np.uint64))
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            seen.append(np.bitwise_xor.reduce(words))

    # the copy waits after its 1st and 24th moves until the reader has made two more passes: passes over a
    # half-moved map are read however the threads are scheduled
    real_mremap, moves = promotion._LIBC.mremap, []

    def mremap_then_let_the_reader_pass(*args):
        moved = real_mremap(*args)
        moves.append(len(seen))
        if len(moves) in (1, 24):
            deadline = time.time() + 60
            while len(seen) < moves[-1] + 2 and time.time() < deadline:
                time.sleep(0.001)
        return moved

    monkeypatch.setattr(promotion._LIBC, "mremap", mremap_then_let_the_reader_pass)
    reader = threading.Thread(target=read)
    reader.start()
    job = promote([(view, [])])
    assert job.wait(120)
    stop.set()
    reader.join()
    assert job.error is None and job.promoted_bytes > 40 * HUGE_PAGE and len(moves) > 24
    assert len(seen) >= 4 and all(s == expected for s in seen)
    assert np.array_equal(view, data)


@needs_promotion
def test_maps_made_meanwhile_are_left_alone(tmp_path, monkeypatch):
    # the staging pages are never placed with MAP_FIXED: an address the copy used and moved away from may have
    # been handed to another map (numba's, malloc's, numpy's) in the meantime. Here a new map is made right after
    # every move, where the kernel likes (often the hole the move just left) and checked after the promotion
    data, m, view = _mapped_file(tmp_path, 32 * HUGE_PAGE, seed=2)
    real_mremap, others = promotion._LIBC.mremap, []

    def mremap_then_map(*args):
        moved = real_mremap(*args)
        block = mmap.mmap(-1, HUGE_PAGE >> (len(others) % 2))
        np.frombuffer(block, np.uint8)[:] = len(others) % 251 + 1
        others.append(block)
        return moved

    monkeypatch.setattr(promotion._LIBC, "mremap", mremap_then_map)
    job = promote([(view, [])])
    assert job.wait(120) and job.error is None and len(others) >= 30
    for i, block in enumerate(others):
        assert (np.frombuffer(block, np.uint8) == i % 251 + 1).all(), f"map {i} was overwritten"
    assert np.array_equal(view, data)


@needs_promotion
def test_close_stops_a_running_promotion_and_keeps_what_it_moved(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(fixture_path(*F32).read_bytes())
    f = GGUFFile(path)
    before = {name: f.raw(name).copy() for name in f.tensors}
    job = f.promote()
    assert job is not None and f.promote() is job  # once per file
    f.close()
    assert job.done.is_set() and job.error is None
    f2 = GGUFFile(path)
    assert all(np.array_equal(f2.raw(name), before[name]) for name in f2.tensors)


@needs_promotion
def test_release_after_a_promotion_keeps_bytes_that_are_read_again():
    f = GGUFFile(fixture_path(*F32))
    blocks = f.tensors["blk.0.ffn_down.weight"].offset
    view = f._data[blocks:]  # the layers' tensors, 4.7 MB: at least one whole promoted huge page
    before = view.copy()
    assert f.promote().wait(60)
    lo, hi = view.ctypes.data, view.ctypes.data + view.nbytes   # one read of smaps (a read per page took minutes)
    anonymous = [int(fields["Anonymous"][0]) * 1024
                 for start, end, fields in smaps_mappings() if start < hi and end > lo]
    assert max(anonymous) >= HUGE_PAGE
    f.release(view, read_again=True)  # madvise(DONTNEED) here would free the promoted pages: zeros
    assert np.array_equal(view, before)


def _logits(model, tokens):
    T = len(tokens)
    n_blocks = (T + 15) // 16
    kv = model.new_kv_cache(n_blocks, 16)
    batch = Batch(np.array(tokens, np.int32), np.arange(T, dtype=np.int32), np.zeros(T, np.int32),
                  np.arange(n_blocks, dtype=np.int32)[None], np.array([T - 1], np.int32))
    return model.forward(batch, kv)[0]


@needs_promotion
def test_a_promoted_model_gives_bitnetcpps_logits():
    ref = load_reference("tiny-llama", "f32")["results"][0]
    tokens = ref["prompt_ids"][:16]
    mapped = Model.load(str(fixture_path(*F32)), promote=False)
    assert mapped.gguf.promotion is None
    promoted = Model.load(str(fixture_path(*F32)))
    job = promoted.gguf.promotion
    during = _logits(promoted, tokens)  # while the copy may still run
    assert job.wait(60) and job.error is None and job.promoted_bytes >= 2 * HUGE_PAGE
    after = _logits(promoted, tokens)
    assert np.array_equal(during, _logits(mapped, tokens)) and np.array_equal(after, during)
    full = _logits(promoted, ref["prompt_ids"])
    assert np.abs(full - np.array(ref["last_prompt_logits"], np.float32)).max() < 1e-2  # the parity tolerance


def test_nothing_is_promoted_where_it_is_not_possible_or_does_not_fit(tmp_path, monkeypatch, caplog):
    data, m, view = _mapped_file(tmp_path, 3 * HUGE_PAGE)
    monkeypatch.setattr(promotion, "promotion_possible", lambda: False)
    assert promote([(view, [])]) is None
    monkeypatch.setattr(promotion, "promotion_possible", lambda: True)
    monkeypatch.setattr(promotion, "fits_in_memory", lambda size: False)
    with caplog.at_level(logging.WARNING, logger="bitnet_py.promotion"):
        assert promote([(view, [])]) is None
    assert "do not fit in the memory available" in caplog.text
    assert np.array_equal(view, data)


@needs_promotion
def test_a_server_answers_bitnetcpps_tokens_while_and_after_its_weights_are_promoted():
    from bitnet_py.engine import EngineConfig
    from live_server import LiveServer
    ref = load_reference("tiny-llama", "f32")
    srv = LiveServer(lambda: Model.load(str(fixture_path(*F32))), EngineConfig(max_num_seqs=4, ctx_size=256))
    try:
        job = srv.engine.model.gguf.promotion
        for i, r in enumerate(ref["results"]):
            if i == len(ref["results"]) // 2:
                assert job.wait(60) and job.error is None and job.promoted_bytes >= 2 * HUGE_PAGE
            with srv.client() as c:
                out = c.post("/completion", json={"prompt": r["prompt"], "n_predict": 16, "temperature": 0,
                                                  "ignore_eos": True}).json()
            near_tie = next((k for k, step in enumerate(r["steps"]) if step["margin"] < 0.1), len(r["steps"]))
            n = min(16, near_tie)
            assert out["tokens"][:n] == r["gen_ids"][:n], r["prompt"]
    finally:
        srv.stop()


@needs_promotion
def test_a_screened_head_that_requests_read_whole_is_promoted_then(tmp_path, monkeypatch):
    from bitnet_py import dummy
    wide = dataclasses.replace(dummy.LAYOUTS["tiny"], hp=dummy._hp(2, 256, 768, 4, 1, 16384, 2048, 500000.0, 1e-5))
    monkeypatch.setitem(dummy.LAYOUTS, "tiny-wide-vocab", wide)  # an 8 MiB tied f16 head: whole huge pages
    path = dummy.make_dummy("tiny-wide-vocab", "i2_s", str(tmp_path / "m.gguf"), seed=3, progress=False)
    model = Model.load(path)
    assert model.weights.screen is not None and model.gguf.promotion is None  # nothing else to promote here
    head = model.gguf.raw("token_embd.weight")  # tied: the head's rows
    before, middle = head.copy(), head.nbytes // 2
    tokens = [1, 50, 300, 7]
    T = len(tokens)
    batch = Batch(np.array(tokens, np.int32), np.arange(T, dtype=np.int32), np.zeros(T, np.int32),
                  np.zeros((1, 1), np.int32), np.array([T - 1], np.int32))
    screened = model.forward(batch, model.new_kv_cache(1, 16), [TopRequest(1)])
    # the screen reads a few rows: the head stays in the file map, no promotion of it started
    assert _anonymous_bytes(head, middle) == 0 and not model.gguf._tensor_promotions
    full = model.forward(batch, model.new_kv_cache(1, 16))  # all logits (a logprobs request): promoted now
    job = model.gguf._tensor_promotions.get("token_embd.weight")  # started by that forward
    assert job is not None and model.gguf.promote_tensor("token_embd.weight") is job  # once
    assert job.wait(60) and job.error is None and job.promoted_bytes >= 2 * HUGE_PAGE
    assert _anonymous_bytes(head, middle) > 0 and np.array_equal(head, before)
    assert np.array_equal(model.forward(batch, model.new_kv_cache(1, 16)), full)
    assert np.nanargmax(screened[0]) == np.argmax(full[0])
    wide_k = Model.load(path)  # a top k the screen cannot cut (above SCREEN_MAX_K) reads the head whole too
    wide_k.forward(batch, wide_k.new_kv_cache(1, 16), [TopRequest(300)])
    assert wide_k.gguf._tensor_promotions.get("token_embd.weight") is not None
    kept = Model.load(path, promote=False)  # --keep-file-map: nothing moves, not even later
    kept.forward(batch, kept.new_kv_cache(1, 16))
    assert kept.gguf.promote_tensor("token_embd.weight") is None
