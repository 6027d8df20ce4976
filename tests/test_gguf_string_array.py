"""Long GGUF string arrays (vocabulary, merges) stay in the memory map as a StringArray: same values as the eager
lists, still validated at open, and the tokenizer built from them gives the reference ids."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from bitnet_py.dummy_vocab import synthetic_bpe
from bitnet_py.gguf import reader
from bitnet_py.gguf.constants import GGMLType, Keys
from bitnet_py.gguf.reader import GGUFError, GGUFFile
from bitnet_py.gguf.string_array import StringArray
from bitnet_py.gguf.writer import GGUFWriter
from bitnet_py.tokenizer import Tokenizer
from conftest import fixture_path, load_reference

N_LONG = reader.LAZY_STRING_ARRAY_MIN + 5
# multi-byte UTF-8, empty strings, a duplicate ("dup" at 3 and N_LONG - 1), then filler
LONG = ["ä", "", "🙂x", "dup", "a b"] + [f"w{i}" for i in range(5, N_LONG - 1)] + ["dup"]


def _write(path, metadata: dict):
    with GGUFWriter(path) as w:
        w.add("general.architecture", "llama")
        for k, v in metadata.items():
            w.add(k, v)
        w.add_tensor_info("a.weight", (4,), GGMLType.F32)
        w.write_header()
        w.write_tensor("a.weight", np.ones(4, np.float32))
    return path


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sa") / "long.gguf"
    return _write(path, {"x.long": LONG, "x.short": ["a", "b"], "x.after": 7})


def test_long_string_array_is_lazy_and_equals_the_list(long_file):
    f = GGUFFile(long_file)
    arr, short = f.metadata["x.long"], f.metadata["x.short"]
    assert isinstance(arr, StringArray) and isinstance(short, list) and short == ["a", "b"]
    assert f.metadata["x.after"] == 7  # parsing went on after the array
    assert len(arr) == N_LONG
    assert arr == LONG and LONG == arr and list(arr) == LONG and arr.tolist() == LONG
    assert arr != LONG[:-1] and arr != [*LONG[:-1], "other"] and arr != "not a list"
    assert [arr[i] for i in (0, 1, 2, -1, -N_LONG, np.int64(4))] == ["ä", "", "🙂x", "dup", "ä", "a b"]
    assert arr[1:4] == LONG[1:4] and arr[::-700] == LONG[::-700] and arr[-3:] == LONG[-3:]
    for bad in (N_LONG, -N_LONG - 1):
        with pytest.raises(IndexError):
            arr[bad]
    assert "🙂x" in arr and "nope" not in arr and 5 not in arr
    assert arr.index("dup") == 3 and arr.count("dup") == 2
    assert arr.raw(2) == "🙂x".encode() and arr.byte_lengths()[:3].tolist() == [2, 0, 5]
    assert arr.find(["dup", "ä", "missing", "\ud800"]) == {"dup": N_LONG - 1, "ä": 0}  # last id of a repeat


def test_invalid_utf8_decodes_with_replacement_like_the_eager_reader(tmp_path):
    path = _write(tmp_path / "bad.gguf", {"x.long": ["ok"] + ["\x00\x00"] * (N_LONG - 1)})
    data = bytearray(path.read_bytes())
    pos = data.index(struct.pack("<Q", 2) + b"\x00\x00")
    data[pos + 8:pos + 10] = b"\xff\xc3"  # invalid, then a truncated 2-byte sequence
    path.write_bytes(bytes(data))
    arr = GGUFFile(path).metadata["x.long"]
    assert arr[1] == b"\xff\xc3".decode("utf-8", "replace") == "\ufffd\ufffd"
    assert arr.find(["\ufffd\ufffd"]) == {"\ufffd\ufffd": 1}  # found by value, as a list would


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_truncated_inside_a_lazy_array_fails_at_open(tmp_path, long_file, cut):
    data = long_file.read_bytes()
    start = data.index(b"x.long")
    end = data.index(b"x.short")
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:start + int((end - start) * cut)])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(p)


def test_lying_string_length_or_count_fails_at_open(tmp_path, long_file):
    data = long_file.read_bytes()
    first = data.index(struct.pack("<Q", 2) + "ä".encode())  # length field of element 0
    for what, pos, value, msg in (("length", first, 1 << 40, "absurd string length"),
                                  ("count", first - 8, 1 << 39, "truncated")):  # fails before allocating
        bad = bytearray(data)
        bad[pos:pos + 8] = struct.pack("<Q", value)
        p = tmp_path / f"{what}.gguf"
        p.write_bytes(bytes(bad))
        with pytest.raises(GGUFError, match=f"{msg}.*x.long"):
            GGUFFile(p)


@pytest.fixture
def all_string_arrays_lazy(monkeypatch):
    monkeypatch.setattr(reader, "LAZY_STRING_ARRAY_MIN", 1)


@pytest.mark.parametrize("model,kind", [("tiny-bitnet", "i2_s"), ("tiny-llama", "i2_s")])  # SPM, BPE
def test_tokenizer_from_lazy_arrays_matches_bitnet_cpp(all_string_arrays_lazy, model, kind):
    meta = GGUFFile(fixture_path(model, f"ggml-model-{kind}.gguf")).metadata
    assert isinstance(meta[Keys.TOKENS], StringArray)
    tok = Tokenizer.from_gguf_metadata(meta)
    assert isinstance(tok.tokens, StringArray)  # not copied into a list
    for r in load_reference(model, kind)["results"]:
        assert tok.encode(r["prompt"]) == r["prompt_ids"], r["prompt"]
        assert [tok.token_bytes(i).hex() for i in r["gen_ids"]] == r["gen_pieces_hex"]
        assert tok.decode(r["gen_ids"]) == r["gen_text"]


def test_2b4t_size_vocabulary_read_lazily_tokenizes_like_the_lists(tmp_path):
    """A 128256-token Llama-3-style vocabulary (the 2B-4T layout): the tokenizer over the file's StringArrays
    equals the one over the generator's Python lists (ids, specials, stops, pieces)."""
    meta = synthetic_bpe(128256, seed=1, chat_template=None)
    f = GGUFFile(_write(tmp_path / "vocab.gguf", meta))
    assert isinstance(f.metadata[Keys.TOKENS], StringArray) and isinstance(f.metadata[Keys.MERGES], StringArray)
    assert f.metadata[Keys.TOKENS] == meta[Keys.TOKENS] and f.metadata[Keys.MERGES] == meta[Keys.MERGES]
    lazy, eager = Tokenizer.from_gguf_metadata(f.metadata), Tokenizer.from_gguf_metadata(meta)
    assert (lazy.bos_id, lazy.eos_id, lazy.eot_id, lazy.stop_ids) == (eager.bos_id, eager.eos_id, eager.eot_id,
                                                                      eager.stop_ids)
    assert lazy._matchable == eager._matchable and lazy.vocab_size == eager.vocab_size == 128256
    rng = np.random.default_rng(0)
    symbols = [*"abcdefghij XYZ\n,.'!0123456789", "é", "🙂", "<|eot_id|>", "<|start_header_id|>"]
    for _ in range(50):
        text = "".join(rng.choice(symbols, 60))
        assert lazy.encode(text, parse_special=True) == eager.encode(text, parse_special=True), text
    for i in rng.integers(0, 128256, 2000).tolist() + list(range(128000, 128256)):
        assert lazy.token_bytes(i) == eager.token_bytes(i)
        assert lazy.is_special(i) == eager.is_special(i)


def test_lazy_array_written_back_round_trips(tmp_path, long_file):
    # converters and tools copy a model's metadata into a new file: a StringArray must be writable
    arr = GGUFFile(long_file).metadata["x.long"]
    assert isinstance(arr, StringArray)
    copy = GGUFFile(_write(tmp_path / "copy.gguf", {"x.long": arr}))
    assert copy.metadata["x.long"] == LONG


def _scan_reference(data: bytes, pos: int, count: int, end: int, max_len: int):
    """The loop the faster scan replaced (every bound checked before its read): starts, or the ValueError
    message."""
    starts = []
    for _ in range(count):
        if pos + 8 > end:
            return "file truncated"
        starts.append(pos)
        (n,) = struct.unpack_from("<Q", data, pos)
        if n > max_len:
            return f"absurd string length {n}"
        pos += 8 + n
    return "file truncated" if pos > end else starts + [pos]


@pytest.mark.parametrize("seed", range(6))
def test_scan_matches_the_loop_that_checks_every_bound(seed):
    from bitnet_py.gguf.string_array import scan_string_array
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, 300)
    lengths[rng.integers(0, 300)] = [0, 1 << 40, 39, 255][seed % 4]  # a lying length in two of the cases
    data = b"".join(struct.pack("<Q", int(n)) + bytes(int(min(n, 40))) for n in lengths) + b"tail"
    for count, end in ((300, len(data) - 4), (300, len(data) - 5), (299, len(data)), (120, len(data)), (0, 0)):
        want = _scan_reference(data, 0, count, end, 1 << 20)
        try:
            got = scan_string_array(data, 0, count, end, 1 << 20).tolist()
        except ValueError as e:
            got = str(e)
        assert got == want, (count, end)
