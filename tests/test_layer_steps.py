"""kernels.layer_steps (a layer as two compiled calls around attention, all layers in one) against the model's
general path, which
runs the same kernels one Python call at a time (each kernel has its own numpy reference in test_kernels*.py):
logits must be bit-identical, for the three graphs (bitnet-b1.58: squared ReLU and sub-norms; bitnet: SiLU
and sub-norms; llama: SiLU, no sub-norms), prefill (parallel row kernels), one-token decode and two sequences
in one step."""
import numba
import numpy as np
import pytest

import bitnet_py.model as model_module
from bitnet_py.dummy import make_dummy
from bitnet_py.model import LAYER_STEPS_MAX_TOKENS, Batch, Model
from conftest import fixture_path, load_script
from kernels import attention_split
from kernels import config as kernel_config
from kernels import layer_region, layer_steps

pytestmark = pytest.mark.skipif(not layer_steps.HAVE_LAYER_STEPS, reason="layer steps need F16C (not this host)")


def _steps(model, kv):
    """A 9-token prefill of sequence 0, a 5-token prefill of sequence 1, then two steps decoding both."""
    tables = np.array([[0], [1]], np.int32)
    out = []

    def step(tokens, positions, seqs):
        tokens, positions, seqs = (np.asarray(a, np.int32) for a in (tokens, positions, seqs))
        out.append(model.forward(Batch(tokens, positions, seqs, tables, np.arange(len(tokens), dtype=np.int32)), kv))

    step(np.arange(9) + 5, np.arange(9), np.zeros(9))
    step(np.arange(5) + 40, np.arange(5), np.ones(5))
    step([17, 23], [9, 5], [0, 1])
    step([31], [10], [0])
    return out


def _count(mp, name, calls):
    real = getattr(layer_steps, name)
    mp.setattr(layer_steps, name, lambda *a: (calls.append(1), real(*a))[1])


def _compare(path):
    """One call per step for all layers (decode_layers), two calls per layer (the model's loop, where the stack
    call does not apply) and the general path: the same logits."""
    model = Model.load(str(path))
    model._region = None  # one-token steps: kernels.layer_region where it applies (test_layer_region.py)
    assert model._steps is not None and model._stack is not None
    stack_calls, layer_calls = [], []
    with pytest.MonkeyPatch.context() as mp:
        _count(mp, "decode_layers", stack_calls)
        _count(mp, "attention_inputs", layer_calls)
        fast = _steps(model, model.new_kv_cache(2, 16))
        assert len(stack_calls) == 4 and not layer_calls  # every step took the one-call path
        per_layer = Model.load(str(path))
        per_layer._stack = per_layer._region = None
        by_layer = _steps(per_layer, per_layer.new_kv_cache(2, 16))
    assert len(layer_calls) == 4 * model.config.n_layer  # every layer of every step took the two-call path
    general = Model.load(str(path))
    general._steps = None
    for a, b, c in zip(fast, by_layer, _steps(general, general.new_kv_cache(2, 16))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("model,kind", [("tiny-bitnet", "i2_s"), ("tiny-llama", "i2_s"), ("tiny-bitnet", "tl2")])
def test_layer_steps_identical_to_general_path_on_fixtures(model, kind):
    _compare(fixture_path(model, f"ggml-model-{kind}.gguf"))


def test_layer_steps_identical_on_bitnet_b158_graph(tmp_path):
    """2B-4T's graph (squared-ReLU gate, sub-norms), random weights."""
    _compare(make_dummy("tiny", "i2_s", str(tmp_path / "tiny.gguf"), seed=5, progress=False))


def test_layer_stack_takes_the_split_attention_at_depth(tmp_path):
    """A decode step at 300 keys of a GQA-4 model on 2 threads takes kernels.attention_split's kernel inside
    decode_layers: the same logits as the model's per-layer loop."""
    path = make_dummy("tiny", "i2_s", str(tmp_path / "tiny.gguf"), seed=5, progress=False)
    n = 300
    pos = np.arange(n, dtype=np.int32)
    tables = np.arange(20, dtype=np.int32).reshape(1, 20)
    logits = []
    for stack in (True, False):
        model = Model.load(path)
        model._region = None  # kernels.layer_region's split phases: test_layer_region.py
        if not stack:
            model._stack = None
        kv = model.new_kv_cache(20, 16)
        model.forward(Batch(pos % 97 + 5, pos, np.zeros(n, np.int32), tables, np.array([n - 1], np.int32)), kv)
        with pytest.MonkeyPatch.context() as mp:
            chosen = []
            choose = model_module.choose_attention
            mp.setattr(model_module, "choose_attention", lambda *a: chosen.append(choose(*a)) or chosen[-1])
            mp.setattr(numba, "get_num_threads", lambda: 2)
            logits.append(model.forward(Batch(np.array([7], np.int32), np.array([n], np.int32),
                                              np.zeros(1, np.int32), tables, np.zeros(1, np.int32)), kv))
        assert chosen == [attention_split.paged_attention_split_g4]
    np.testing.assert_array_equal(logits[0], logits[1])


def test_general_path_where_layer_steps_do_not_apply(tmp_path, monkeypatch):
    """Float weights, block-scaled (TQ2_0) weights and the switches (BITNET_PY_LAYER_STEPS=0, no fusion, a
    non-default ternary kernel) keep the general path; a float32 KV cache and steps of more than
    LAYER_STEPS_MAX_TOKENS tokens take it per call."""
    assert Model.load(str(fixture_path("tiny-bitnet", "ggml-model-f32.gguf")))._steps is None
    assert Model.load(make_dummy("tiny", "tq2_0", str(tmp_path / "tq2.gguf"), seed=5, progress=False))._steps is None
    i2s = str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    for name, value in (("LAYER_STEPS", False), ("FUSE", False), ("TERNARY_KERNEL", "lut")):
        with monkeypatch.context() as mp:
            mp.setattr(kernel_config, name, value)
            assert Model.load(i2s)._steps is None, name
    monkeypatch.setattr(layer_steps, "attention_inputs", lambda *a: pytest.fail("took the layer steps"))
    monkeypatch.setattr(layer_steps, "decode_layers", lambda *a: pytest.fail("took the layer steps"))
    monkeypatch.setattr(layer_region, "decode_step_layers", lambda *a: pytest.fail("took the layer region"))
    model = Model.load(i2s, cache_type="f32")
    assert all(np.isfinite(x).all() for x in _steps(model, model.new_kv_cache(2, 16)))
    model = Model.load(i2s)
    T = LAYER_STEPS_MAX_TOKENS + 1
    pos = np.arange(T, dtype=np.int32)
    logits = model.forward(Batch(pos + 5, pos, np.zeros(T, np.int32), np.array([[0, 1]], np.int32),
                                 np.array([T - 1], np.int32)), model.new_kv_cache(2, 16))
    assert np.isfinite(logits).all()


def test_bench_layer_steps_script(capsys):
    """scripts/bench_layer_steps.py: one table row per batch size and thread count, both paths timed, logits
    checked identical; a model without layer steps is refused with a message."""
    import numba
    script = load_script("bench_layer_steps")
    i2s = str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    threads = numba.get_num_threads()
    try:
        assert script.main(["-m", i2s, "-t", "1", "--rounds", "2", "-n", "2", "--tokens", "1,3"]) == 0
    finally:
        numba.set_num_threads(threads)  # the script sets the process's thread count
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |") or
            line.startswith("| 3 |")]
    assert len(rows) == 2
    for row in rows:
        steps, general, ratio = (float(v) for v in row.strip("|").split("|")[2:])
        assert steps > 0 and general > 0 and ratio > 0
    with pytest.raises(SystemExit, match="general path only"):
        script.main(["-m", str(fixture_path("tiny-bitnet", "ggml-model-f32.gguf")), "--rounds", "1", "-n", "1"])
