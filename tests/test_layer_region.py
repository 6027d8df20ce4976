"""kernels.layer_region (a decode step's layers in one parallel region) against kernels.layer_steps'
decode_layers, which runs the same kernels as ~150 parallel regions and is itself checked bit-identical to the
model's general path (test_layer_steps.py): logits must be bit-identical, for both FFN graphs, at several depths,
and whatever the worker count (more workers than threads: some start only after others finished everything).
Also kernels.atomics.atomic_add and kernels.pointers.u8_at."""
import numba
import numpy as np
import pytest
from numba import njit, prange

import bitnet_py.model as model_module
from bitnet_py.dummy import make_dummy
from bitnet_py.model import Batch, Model
from kernels import layer_region, layer_steps
from kernels.atomics import atomic_add
from kernels.pointers import u8_at

needs_region = pytest.mark.skipif(not layer_region.HAVE_LAYER_REGION,
                                  reason="the one-region step needs the base-3 kernels (AVX-512 VBMI + VNNI) and F16C")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """2B-4T's graph (squared-ReLU gate, sub-norms, 4 query heads per KV head), random weights."""
    return make_dummy("tiny", "i2_s", str(tmp_path_factory.mktemp("region") / "tiny.gguf"), seed=7, progress=False)


def _decode(model, n_prompt=20, n_steps=4, seqs=1):
    """A prefill of n_prompt tokens per sequence, then n_steps one-token steps of sequence 0 -> every logits row."""
    blocks = (n_prompt + n_steps + 15) // 16
    tables = np.arange(blocks * seqs, dtype=np.int32).reshape(seqs, blocks)
    kv = model.new_kv_cache(blocks * seqs, 16)
    pos = np.arange(n_prompt, dtype=np.int32)
    out = []
    for s in range(seqs):
        out.append(model.forward(Batch(pos % 89 + 3 + s, pos, np.full(n_prompt, s, np.int32), tables,
                                       np.array([n_prompt - 1], np.int32)), kv))
    for i in range(n_steps):
        p = n_prompt + i
        out.append(model.forward(Batch(np.array([11 + 7 * i], np.int32), np.array([p], np.int32),
                                       np.zeros(1, np.int32), tables, np.zeros(1, np.int32)), kv))
    return out


def _without_region(model):
    model._region = None
    return model


def _count_region_calls(mp):
    calls = []
    real = layer_region.decode_step_layers
    mp.setattr(layer_region, "decode_step_layers", lambda *a: (calls.append(1), real(*a))[1])
    return calls


@needs_region
@pytest.mark.parametrize("n_prompt", [1, 20, 70, 300, 700])
def test_region_identical_to_layer_stack(tiny_path, n_prompt):
    """From 256 keys on, the tiny model's one KV head on 2 threads takes the split attention (its passes as
    phases of the region): 300 and 700 keys are 2 and 3 key chunks."""
    model = Model.load(tiny_path)
    assert model._region is not None
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_region_calls(mp)
        chosen = []
        choose = model_module.choose_attention
        mp.setattr(model_module, "choose_attention", lambda *a: chosen.append(choose(*a)) or chosen[-1])
        mp.setattr(model_module.numba, "get_num_threads", lambda: 2)
        fast = _decode(model, n_prompt, seqs=2)
    split = chosen[-1] is model_module.attention_split.paged_attention_split_g4
    assert split == (n_prompt >= 256)
    assert len(calls) == 4 + (2 if n_prompt == 1 else 0)  # every one-token step took the region
    for a, b in zip(fast, _decode(_without_region(Model.load(tiny_path)), n_prompt, seqs=2)):
        np.testing.assert_array_equal(a, b)


def _silu_without_sub_norms(model):
    """The llama graph's FFN on the same weights: SiLU gate, no sub-norms, in both paths' arguments."""
    none = np.zeros(0, np.float32)
    model._steps = [(pre, (none,) + post[1:10] + (none,) + post[11:13] + (False,)) for pre, post in model._steps]
    model._stack = model._plan_layer_stack()
    model._region = layer_region.region_tables(model._steps) if model._region is not None else None
    return model


@needs_region
def test_region_identical_on_the_silu_graph_without_sub_norms(tiny_path):
    model = _silu_without_sub_norms(Model.load(tiny_path))
    assert model._region is not None and model._region[4].shape[1] == 0 and not model._region[9]
    fast = _decode(model)
    slow = _decode(_without_region(_silu_without_sub_norms(Model.load(tiny_path))))
    assert not np.array_equal(fast[-1], _decode(Model.load(tiny_path))[-1])  # the graph did change
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


@needs_region
@pytest.mark.parametrize("workers", [1, 3, 8])
def test_region_identical_with_any_worker_count(tiny_path, workers, monkeypatch):
    """More workers than numba's 2 threads (a thread runs some workers only after others are done; those find every
    task taken and write nothing), or one: the same logits."""
    reference = _decode(Model.load(tiny_path))
    monkeypatch.setattr(model_module.numba, "get_num_threads", lambda: workers)
    model = Model.load(tiny_path)
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_region_calls(mp)
        out = _decode(model)
    assert len(calls) == 4
    for a, b in zip(out, reference):
        np.testing.assert_array_equal(a, b)


@needs_region
def test_region_on_one_thread(tiny_path):
    """numba at one thread, the model's step asking for two workers: worker 1 starts after worker 0 did every
    task of every layer."""
    reference = _decode(Model.load(tiny_path))
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model_module.numba, "get_num_threads", lambda: 2)
            out = _decode(Model.load(tiny_path))
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(out, reference):
        np.testing.assert_array_equal(a, b)


def _batched(model, n_prompt, seqs=4):
    """A prefill per sequence, then two steps decoding all `seqs` together, then a 3-token chunk of sequence 0 (its
    tokens attend to each other) -> every logits row."""
    blocks = (n_prompt + 8 + 15) // 16
    tables = np.arange(blocks * seqs, dtype=np.int32).reshape(seqs, blocks)
    kv = model.new_kv_cache(blocks * seqs, 16)
    pos = np.arange(n_prompt, dtype=np.int32)
    out = [model.forward(Batch(pos % 83 + 2 + s, pos, np.full(n_prompt, s, np.int32), tables,
                               np.array([n_prompt - 1], np.int32)), kv) for s in range(seqs)]
    all_seqs = np.arange(seqs, dtype=np.int32)
    for i in range(2):
        out.append(model.forward(Batch(all_seqs * 5 + 9 + i, np.full(seqs, n_prompt + i, np.int32), all_seqs, tables,
                                       all_seqs), kv))
    p = np.arange(n_prompt + 2, n_prompt + 5, dtype=np.int32)
    out.append(model.forward(Batch(np.array([4, 8, 15], np.int32), p, np.zeros(3, np.int32), tables,
                                   np.arange(3, dtype=np.int32)), kv))
    return out


@needs_region
@pytest.mark.parametrize("n_prompt", [5, 40])
def test_region_identical_for_several_tokens(tiny_path, n_prompt):
    model = Model.load(tiny_path)
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_region_calls(mp)
        fast = _batched(model, n_prompt)
    assert len(calls) == 3 + (4 if n_prompt <= layer_region.MAX_TOKENS else 0)
    for a, b in zip(fast, _batched(_without_region(Model.load(tiny_path)), n_prompt)):
        np.testing.assert_array_equal(a, b)


@needs_region
def test_switch_and_other_steps_keep_the_layer_stack(tiny_path, monkeypatch):
    """BITNET_PY_LAYER_REGION=0, steps of more than MAX_TOKENS tokens and split attention for several tokens keep
    decode_layers; the split attention of one token is the region's."""
    monkeypatch.setattr(model_module.kernel_config, "LAYER_REGION", False)
    assert Model.load(tiny_path)._region is None
    monkeypatch.undo()
    model = Model.load(tiny_path)
    monkeypatch.setattr(layer_region, "decode_step_layers", lambda *a: pytest.fail("took the region"))
    stack = []
    real = layer_steps.decode_layers
    monkeypatch.setattr(layer_steps, "decode_layers", lambda *a: (stack.append(1), real(*a))[1])
    tables = np.array([[0, 1], [2, 3]], np.int32)
    kv = model.new_kv_cache(4, 16)
    n = layer_region.MAX_TOKENS + 1
    logits = model.forward(Batch(np.arange(n, dtype=np.int32) + 5, np.arange(n, dtype=np.int32),
                                 np.zeros(n, np.int32), tables, np.array([n - 1], np.int32)), kv)
    assert np.isfinite(logits).all() and len(stack) == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "choose_attention", lambda *a: model_module.attention_split.paged_attention_split_g4)
        logits = model.forward(Batch(np.array([5, 9], np.int32), np.array([n, 0], np.int32),
                                     np.array([0, 1], np.int32), tables, np.arange(2, dtype=np.int32)), kv)
    assert np.isfinite(logits).all() and len(stack) == 2
    region = []
    monkeypatch.setattr(layer_region, "decode_step_layers", lambda *a: region.append(a[-3]))
    monkeypatch.setattr(model_module, "choose_attention",
                        lambda *a: model_module.attention_split.paged_attention_split_g4)
    model.forward(Batch(np.array([7], np.int32), np.array([n + 1], np.int32), np.zeros(1, np.int32), tables,
                        np.zeros(1, np.int32)), kv)
    assert len(stack) == 2 and region == [True]  # the region, told to split


@njit(parallel=True)
def _add_from_threads(counter, n):
    for t in prange(4):
        for _ in range(n):
            atomic_add(counter, 0, 1)


def test_atomic_add_from_threads_at_once():
    counter = np.zeros(8, np.int64)
    _add_from_threads(counter, 20000)
    assert counter[0] == 80000 and not counter[1:].any()


@njit
def _add_once(a, v):
    return atomic_add(a, 3, v)


def test_atomic_add_returns_the_old_value():
    a = np.arange(5, dtype=np.int64)
    assert _add_once(a, 10) == 3 and a.tolist() == [0, 1, 2, 13, 4]


@njit
def _sum_at(address, n):
    return u8_at(address, n).astype(np.int64).sum()


def test_u8_at_views_the_array_at_an_address():
    data = np.arange(200, dtype=np.uint8)
    assert _sum_at(data[10:].ctypes.data, 50) == int(data[10:60].astype(np.int64).sum())
