"""Sampler and stop-string matcher against slow, obviously-correct references."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bitnet_py.sampling import (SamplingParams, SamplingParamsError, _apply_penalties, compute_logprobs,
                                make_rng, sample_token)
from bitnet_py.sequence import StopStringMatcher

V = 50


def _logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(V) * 2).astype(np.float32)


def _draw(logits, params, n, seed=123, context=()):
    rng = make_rng(seed)
    ctx = np.asarray(context, dtype=np.int32)
    return [sample_token(logits, params, rng, ctx)[0] for _ in range(n)]


def test_greedy_takes_first_maximum_in_id_order():
    logits = np.zeros(V, dtype=np.float32)
    logits[[7, 3, 30]] = 5.0
    tok, _ = sample_token(logits, SamplingParams(temperature=0.0), make_rng(0), np.zeros(0, np.int32))
    assert tok == 3


def test_top_k_1_equals_greedy_at_any_temperature():
    logits = _logits(1)
    assert set(_draw(logits, SamplingParams(temperature=1.5, top_k=1, top_p=1, min_p=0), 50)) == {int(np.argmax(logits))}


def test_same_seed_same_tokens_different_seed_differs():
    logits = np.zeros(V, dtype=np.float32)      # uniform: draws are pure rng
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = _draw(logits, p, 40, seed=42)
    assert a == _draw(logits, p, 40, seed=42)
    assert a != _draw(logits, p, 40, seed=43)


def test_full_distribution_matches_softmax():
    logits = _logits(2)
    t = 0.7
    n = 20000
    counts = np.bincount(_draw(logits, SamplingParams(temperature=t, top_k=0, top_p=1.0, min_p=0.0), n), minlength=V)
    ref = np.exp(logits.astype(np.float64) / t)
    ref /= ref.sum()
    # every token with real mass shows up in proportion (binomial std tolerance)
    tol = 5 * np.sqrt(ref * (1 - ref) / n) + 1e-3
    assert np.all(np.abs(counts / n - ref) <= tol)


def _reference_support(logits, top_k, top_p, min_p):
    order = sorted(range(V), key=lambda i: (-logits[i], i))
    if top_k > 0:
        order = order[:top_k]
    probs = np.exp(np.array([logits[i] for i in order], dtype=np.float64) - logits[order[0]])
    probs /= probs.sum()
    keep = len(order)
    cum = 0.0
    for j, p in enumerate(probs):
        cum += p
        if cum >= top_p:
            keep = min(keep, j + 1)
            break
    keep = min(keep, max(1, sum(1 for p in probs if p >= min_p * probs[0])))
    return set(order[:keep])


@pytest.mark.parametrize("top_k,top_p,min_p", [(10, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (8, 0.8, 0.1)])
def test_truncation_support_matches_reference(top_k, top_p, min_p):
    logits = _logits(3)
    got = set(_draw(logits, SamplingParams(temperature=3.0, top_k=top_k, top_p=top_p, min_p=min_p), 4000))
    assert got == _reference_support(logits, top_k, top_p, min_p)


def test_penalties_match_reference_loop():
    logits = _logits(4)
    context = np.array([1, 2, 2, 5, 9, 9, 9, 40, 1], dtype=np.int32)
    p = SamplingParams(repeat_penalty=1.3, repeat_last_n=6, presence_penalty=0.5, frequency_penalty=0.25)
    got = logits.copy()
    _apply_penalties(got, p, context)
    ref = logits.astype(np.float64).copy()
    window = list(context[-6:])
    for tok in set(window):
        v = ref[tok]
        v = v / 1.3 if v > 0 else v * 1.3
        ref[tok] = v - window.count(tok) * 0.25 - 0.5
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_logit_bias_bans_and_forces():
    logits = _logits(5)
    best = int(np.argmax(logits))
    greedy_banned = SamplingParams(temperature=0.0, logit_bias=((best, -math.inf),))
    assert _draw(logits, greedy_banned, 1)[0] != best
    forced = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logit_bias=((11, 100.0),))
    assert set(_draw(logits, forced, 200)) == {11}


def test_logprobs_are_raw_log_softmax():
    logits = _logits(6)
    info = compute_logprobs(logits, 4, 3)
    ref = logits.astype(np.float64) - np.log(np.sum(np.exp(logits.astype(np.float64))))
    assert info.token_id == 4
    assert info.logprob == pytest.approx(ref[4], abs=1e-9)
    order = sorted(range(V), key=lambda i: -ref[i])[:3]
    assert [t for t, _ in info.top] == order
    assert [lp for _, lp in info.top] == pytest.approx([ref[i] for i in order], abs=1e-9)


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p"), ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"top_k": 1.5}, "top_k"), ({"logprobs": 21}, "logprobs"),
    ({"seed": "x"}, "seed"), ({"repeat_last_n": -2}, "repeat_last_n"),
])
def test_params_validation_names_the_field(kwargs, param):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def test_logit_bias_vocab_check():
    with pytest.raises(SamplingParamsError):
        SamplingParams(logit_bias=((V, 1.0),)).check_vocab(V)


def _run_matcher(stops, pieces):
    m = StopStringMatcher(tuple(stops))
    out = [m.push(p) for p in pieces]
    return out, m


def test_stop_string_split_across_tokens_is_cut_and_never_leaked():
    out, m = _run_matcher(["END"], ["hello E", "N", "D and more"])
    assert "".join(out) == "hello "
    assert m.matched == "END"
    assert out[0] == "hello "          # "E" held back: could start "END"
    assert all("E" not in o for o in out[1:])


def test_held_back_prefix_released_when_it_does_not_match():
    out, m = _run_matcher(["END"], ["a E", "Nx", " b"])
    assert m.matched is None
    assert "".join(out) + m.flush() == "a ENx b"
    assert out[0] == "a "


def test_flush_releases_held_tail_at_end_of_generation():
    out, m = _run_matcher(["</answer>"], ["42 </ans"])
    assert out == ["42 "]
    assert m.flush() == "</ans"


def test_earliest_of_several_stop_strings_wins():
    out, m = _run_matcher(["cat", "at"], ["the c", "at sat"])
    assert "".join(out) == "the "
    assert m.matched == "cat"
