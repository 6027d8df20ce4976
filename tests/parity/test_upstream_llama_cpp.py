"""Upstream llama.cpp (through llama-cpp-python, pinned and built by scripts/install_llama_cpp_python.sh) as a
real peer in the normal suite: same GGUF, full-vocabulary logits at every position, greedy tokens, tokenization.

Files: the fixtures' F32 files and TQ2_0 files our converter makes from the fixtures' hf/ (upstream reads neither
I2_S (36) nor bitnet.cpp's TL2 (39 is another type upstream); those are covered by the recorded fixtures and
`pytest --parity --llama-server`). Upstream's `bitnet` arch uses SiLU, right for these fixture models; it has no
`bitnet-b1.58` arch (2B-4T, squared ReLU) at all, which the last test records.

TQ2_0: both engines quantize a ternary matmul's input per 256 values (Q8_K; kernels/q8k.py), so one token per
call the logits agree to float rounding at most positions (checked for the engine and for q8k_reference.py, the
numpy statement of upstream's arithmetic). In a batch, upstream's multi-token attention rounds differently from
bitnet.cpp's (which we follow), and int8 re-quantization amplifies that on ternary files (tolerance below).

Without llama_cpp installed these tests skip, unless BITNET_PARITY_REQUIRE_PEER=1 (CI), where that is a failure.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from . import report
from .compare import FLOAT_TOL, TERNARY_TOL, Tolerance, compare_greedy, compare_logits, first_difference, margins
from .models import default_specs, load_ours
from .ours import all_position_logits, greedy_run, is_ternary
from .prompts import MULTI_TURN, fixture_prompts, long_prompt

try:
    import llama_cpp
except ImportError:  # not installed: see scripts/install_llama_cpp_python.sh
    llama_cpp = None

REQUIRED = os.environ.get("BITNET_PARITY_REQUIRE_PEER") == "1"
pytestmark = pytest.mark.skipif(llama_cpp is None and not REQUIRED,
                                reason="llama-cpp-python not installed (scripts/install_llama_cpp_python.sh)")

FILES = ["tiny-bitnet/f32", "tiny-llama/f32", "tiny-bitnet/tq2_0", "tiny-llama/tq2_0"]
N_PREDICT = 32
BATCH_PROMPTS = (0, 2, 3, 4, 5, 7)  # fixture prompts of the every-position check (plus the long prompt)
FREE_RUN_PROMPTS = (7,)  # prompts also compared token by token in free-running greedy decode
SEQUENTIAL_PROMPTS = (0, 4, 7)  # prompts of the one-token-per-call TQ2_0 arithmetic checks

# Batched TQ2_0 logits vs upstream: attention rounded as bitnet.cpp does vs upstream's multi-token rounding,
# amplified by int8 re-quantization: 0.12-0.21 (median of per-position max), up to 0.35 (docs/parity.md): the
# usual ternary tolerance, with argmax compared only where the margin exceeds twice the tolerance (which no two
# logit sets within the tolerance can swap; a few positions differ at margins between 0.1 and 1.0).
UPSTREAM_TQ_TOL = Tolerance(logits=0.5, probs=0.25, near_tie=1.0)


def upstream_tolerance(model) -> Tolerance:
    return UPSTREAM_TQ_TOL if is_ternary(model) else FLOAT_TOL


class Upstream:
    """One llama.cpp context over a GGUF, with logits kept for every evaluated position."""

    def __init__(self, path: str, n_ctx: int = 1024, ubatch: int = 512):
        # one thread: the tiny models gain nothing from more, and ggml's spinning workers crawl on a busy machine
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=ubatch, n_ubatch=ubatch, n_threads=1,
                                   n_threads_batch=1, logits_all=True, flash_attn=False, seed=0, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Evaluate ids in one batch from an empty cache -> f32[T, V]."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """Prompt in one batch, then one token per eval; first maximum in id order -> ids, f32[n, V] logits."""
        self.llm.reset()
        self.llm.eval(ids)
        out, steps = [], []
        for i in range(n):
            row = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            steps.append(row)
            out.append(int(np.argmax(row)))
            if i + 1 < n:
                self.llm.eval([out[-1]])
        return out, np.stack(steps)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """name (tiny-llama/f32, tiny-bitnet/tq2_0, ...) -> GGUF path; converted files are made once per module."""
    work = tmp_path_factory.mktemp("upstream-models")
    return lambda name: next(s for s in default_specs() if s.name == name).materialize(work)


@pytest.fixture(scope="module", params=FILES)
def pair(request, model_file):
    if llama_cpp is None:
        pytest.fail("BITNET_PARITY_REQUIRE_PEER=1 but llama-cpp-python is not installed")
    spec = next(s for s in default_specs() if s.name == request.param)
    path = model_file(spec.name)
    up = Upstream(path)
    yield spec, load_ours(path), up
    up.llm.close()


def test_tokenization_matches_upstream(pair):
    spec, model, up = pair
    texts = list(fixture_prompts()) + [long_prompt()] + [model.chat_template.render(list(m)) for m in MULTI_TURN]
    for text in texts:
        ours = model.tokenizer.encode(text, parse_special=True)
        theirs = up.tokenize(text)
        assert first_difference(ours, theirs) is None, f"{text[:40]!r}: ours {ours[:12]} upstream {theirs[:12]}"


def test_logits_at_every_position_and_greedy_tokens(pair):
    """Upstream greedy continuation of each prompt; then prompt + continuation in one batch on both sides:
    full-vocabulary logits at every position within the file kind's tolerance, and the same argmax wherever our
    margin is not a near-tie (greedy tokens under teacher forcing)."""
    spec, model, up = pair
    tol = upstream_tolerance(model)
    worst, diffs, n_pos = 0.0, [], 0
    for text in [fixture_prompts()[i] for i in BATCH_PROMPTS] + [long_prompt()]:
        prompt = model.tokenizer.encode(text, parse_special=True)
        gen, _ = up.greedy(prompt, N_PREDICT)
        ids = prompt + gen[:-1]
        theirs = up.logits(ids)
        ours = all_position_logits(model, ids)
        rep = compare_logits(ours, theirs, tol.near_tie)
        assert rep.max_abs <= tol.logits, f"{text[:40]!r}: logits differ by {rep.max_abs:.3g} at position " \
                                          f"{rep.worst_row} of {len(ids)}"
        assert not rep.argmax_disagree, f"{text[:40]!r}: argmax differs at positions {rep.argmax_disagree}"
        worst = max(worst, rep.max_abs)
        diffs.append(rep.row_max)
        n_pos += len(ids)
    allrows = np.concatenate(diffs)
    report.add(f"upstream llama.cpp {llama_cpp.__version__} {spec.name:18s} logits, {n_pos} positions x full vocab: "
               f"max |d| {worst:.2e}, median of per-position max {np.median(allrows):.2e}, "
               f"positions over 1e-3: {int((allrows > 1e-3).sum())}")


@pytest.mark.parametrize("prompt_index", FREE_RUN_PROMPTS)
def test_free_running_greedy_decode(pair, prompt_index):
    """Both decode one token per step on their own output: same ids until the first near-tie, and the step
    logits (decode path: one-token calls) within tolerance."""
    spec, model, up = pair
    tol = upstream_tolerance(model)
    prompt = model.tokenizer.encode(fixture_prompts()[prompt_index], parse_special=True)
    gen, their_steps = up.greedy(prompt, N_PREDICT)
    ours = greedy_run(model, prompt, N_PREDICT)
    rep = compare_greedy(ours.ids, np.minimum(ours.step_margins, margins(their_steps)), gen, tol.near_tie)
    assert rep.ok, f"greedy differs at step {rep.mismatch}: ours {ours.ids[:rep.compared]} upstream {gen[:rep.compared]}"
    n = rep.compared
    if n:
        steps = compare_logits(np.stack(ours.step_logits[:n]), their_steps[:n], tol.near_tie)
        assert steps.max_abs <= tol.logits, f"step logits differ by {steps.max_abs:.3g} at step {steps.worst_row}"


def _sequential_logits(model, up_path: str, prompt_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Ours and upstream's logits at every position, one token per call on both sides (the attention roundings of
    one-token calls are the same in both, so only the linears' arithmetic differs)."""
    up = Upstream(up_path, ubatch=1)
    try:
        theirs = up.logits(prompt_ids)
    finally:
        up.llm.close()
    return all_position_logits(model, prompt_ids, ubatch=1), theirs


def _sequential_diffs(model, path: str) -> np.ndarray:
    rows = []
    for i in SEQUENTIAL_PROMPTS:
        ids = model.tokenizer.encode(fixture_prompts()[i], parse_special=True)
        ours, theirs = _sequential_logits(model, path, ids)
        rows.append(np.abs(ours - theirs).max(axis=1))
    return np.concatenate(rows)


TQ_FILES = [f for f in FILES if f.endswith("tq2_0")]


@pytest.mark.parametrize("name", TQ_FILES)
def test_upstream_tq2_0_arithmetic_reproduces_upstream(name, model_file, monkeypatch):
    """With the linears of TQ2_0 weights computed as upstream does (q8k_reference: Q8_K activations), our forward
    reproduces upstream's logits to float rounding at most positions: the exact change the TQ kernels need."""
    if llama_cpp is None:
        pytest.fail("BITNET_PARITY_REQUIRE_PEER=1 but llama-cpp-python is not installed")
    import bitnet_py.model as model_module
    from .q8k_reference import Q8KLinear
    path = model_file(name)
    model = load_ours(path)
    monkeypatch.setattr(model_module, "linear", Q8KLinear(model_module.linear))
    d = _sequential_diffs(model, path)
    report.add(f"upstream llama.cpp {name:18s} one token per call, ours with Q8_K activations (q8k_reference): "
               f"median |d| {np.median(d):.1e}, {(d < 1e-4).mean():.0%} of {d.size} positions < 1e-4, max {d.max():.2e}")
    assert np.median(d) < 1e-4 and (d < 1e-4).mean() > 0.6 and d.max() < TERNARY_TOL.logits


@pytest.mark.parametrize("name", TQ_FILES)
def test_engine_tq2_0_matches_upstream_to_float_rounding(name, model_file):
    if llama_cpp is None:
        pytest.fail("BITNET_PARITY_REQUIRE_PEER=1 but llama-cpp-python is not installed")
    path = model_file(name)
    model = load_ours(path)
    d = _sequential_diffs(model, path)
    report.add(f"upstream llama.cpp {name:18s} one token per call, our engine as is: median |d| {np.median(d):.2e}, "
               f"{(d < 1e-4).mean():.0%} of {d.size} positions < 1e-4, max {d.max():.2e}")
    assert np.median(d) < 1e-4 and (d < 1e-4).mean() > 0.6


def test_upstream_has_no_bitnet_b158_architecture(tmp_path):
    """Documented limitation: upstream cannot load the 2B-4T layout (`bitnet-b1.58`, squared ReLU), so that
    architecture is checked against transformers (tests/test_parity_transformers.py), not upstream."""
    if llama_cpp is None:
        pytest.fail("BITNET_PARITY_REQUIRE_PEER=1 but llama-cpp-python is not installed")
    from bitnet_py.dummy import make_dummy
    path = tmp_path / "tiny-b158-tq2_0.gguf"
    make_dummy("tiny", "tq2_0", str(path), seed=0, progress=False)
    with pytest.raises(ValueError):
        llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
