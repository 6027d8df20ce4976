"""Tests of the parity harness itself (normal suite, no llama-server binary needed):
- the old-server conventions it relies on, checked against bitnet.cpp's recorded llama-server answers;
- the comparison functions on cases where the answer is known;
- the whole check pipeline against a replay of the recorded answers (must pass) and against tampered replays
  (must fail), and against our own server as a new-format, llama-server-compatible peer;
- the launcher and the --parity option plumbing, with a command-line shim around our server standing in for a
  llama-server binary.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, fixture_path, load_reference
from live_server import LiveServer

from .checks import check_chat, check_completion, check_tokenization, text_agreement
from .compare import (FLOAT_TOL, compare_generated_text, compare_greedy, compare_logits, compare_topk,
                      incomplete_utf8_tail, label_index, old_server_label, probs_like_peer, trusted_prefix)
from .launcher import LlamaServerProcess, ServerCannotLoad
from .models import load_ours
from .peer import PROBS_FULL, PROBS_TOPK, Candidate, PeerClient, PeerStep, parse_probabilities
from .prompts import MULTI_TURN
from .replay_server import RecordedServerReplay

FILES = [(m, k) for m in ("tiny-bitnet", "tiny-llama") for k in ("f32", "i2_s", "tl2")]
_MODELS: dict = {}


def _model(name: str, kind: str):
    if (name, kind) not in _MODELS:
        _MODELS[(name, kind)] = load_ours(str(fixture_path(name, f"ggml-model-{kind}.gguf")))
    return _MODELS[(name, kind)]


# ---- old-server conventions vs the recorded answers -------------------------------------------------------------
@pytest.mark.parametrize("name,kind", FILES)
def test_old_server_entries_follow_the_utf8_rule_and_labels(name, kind):
    """The recorded completion_probabilities hold one entry per step that leaves no unfinished multi-byte
    character, labelled as old_server_label prints the token."""
    for r in load_reference(name, kind)["results"]:
        text, labels = b"", []
        for h in r["gen_pieces_hex"]:
            piece = bytes.fromhex(h)
            text += piece
            if not incomplete_utf8_tail(text):
                labels.append(old_server_label(piece))
        assert labels == [e["content"] for e in r["server"]["completion_probabilities"]], r["prompt"]


@pytest.mark.parametrize("name,kind", [("tiny-bitnet", "f32"), ("tiny-llama", "i2_s")])
def test_old_server_probs_are_softmax_over_the_top5_only(name, kind):
    """Step 0's recorded server probabilities equal a softmax over the 5 best recorded logits (PROBS_TOPK), not the
    full-vocabulary softmax (which refdump's top5 `p` holds: PROBS_FULL)."""
    model = _model(name, kind)
    index = label_index(model.tokenizer)
    for r in load_reference(name, kind)["results"]:
        logits = np.array(r["last_prompt_logits"], np.float32)
        entry = r["server"]["completion_probabilities"][0]
        if not r["gen_pieces_hex"] or incomplete_utf8_tail(bytes.fromhex(r["gen_pieces_hex"][0])):
            continue  # step 0 has no entry
        ids = [max(index[c["tok_str"]], key=lambda t: logits[t]) for c in entry["probs"]]
        assert ids == [t["id"] for t in r["steps"][0]["top5"]]
        theirs = np.array([c["prob"] for c in entry["probs"]])
        assert np.abs(probs_like_peer(logits, ids, PROBS_TOPK) - theirs).max() < 1e-5
        full = np.array([t["p"] for t in r["steps"][0]["top5"]])
        assert np.abs(probs_like_peer(logits, ids, PROBS_FULL) - full).max() < 1e-5
        assert np.abs(full - theirs).max() > 1e-3  # the two kinds really differ


def test_parse_probabilities_both_shapes():
    old = [{"content": "a", "probs": [{"tok_str": "a", "prob": 0.75}, {"tok_str": "b", "prob": 0.25}]}]
    steps, kind = parse_probabilities(old)
    assert kind == PROBS_TOPK and steps[0].id is None and [c.prob for c in steps[0].top] == [0.75, 0.25]
    new = [{"id": 7, "token": "a", "logprob": -0.1, "bytes": [97],
            "top_logprobs": [{"id": 7, "token": "a", "logprob": float(np.log(0.5)), "bytes": [97]}]}]
    steps, kind = parse_probabilities(new)
    assert kind == PROBS_FULL and steps[0].id == 7 and steps[0].top[0].id == 7
    assert abs(steps[0].top[0].prob - 0.5) < 1e-12
    with pytest.raises(ValueError):
        parse_probabilities([{"weird": 1}])


# ---- comparison functions -------------------------------------------------------------------------------------
def test_greedy_comparison_stops_at_the_first_near_tie():
    margins = [1.0, 0.5, 0.05, 2.0]
    assert trusted_prefix(margins, 0.1) == 2
    assert compare_greedy([1, 2, 3, 4], margins, [1, 2, 9, 9], 0.1).ok  # differs only after the near-tie
    rep = compare_greedy([1, 2, 3, 4], margins, [1, 5, 3, 4], 0.1)
    assert not rep.ok and rep.mismatch == 1 and rep.compared == 2


def test_logit_comparison_flags_confident_argmax_changes_only():
    ours = np.array([[0.0, 1.0, 0.0], [0.0, 0.05, 0.0]], np.float32)  # row 1 is a near-tie
    theirs = np.array([[0.0, 0.9, 1.2], [0.06, 0.0, 0.0]], np.float32)
    rep = compare_logits(ours, theirs, 0.1)
    assert rep.argmax_disagree == [0] and rep.worst_row == 0 and abs(rep.max_abs - 1.2) < 1e-6


def test_topk_comparison_uses_the_peers_normalization():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    renorm = [PeerStep(None, "x", [Candidate(0, "", 0.5 / 0.8), Candidate(1, "", 0.3 / 0.8)])]
    assert compare_topk([logits], renorm, PROBS_TOPK, FLOAT_TOL).max_abs < 1e-12
    assert compare_topk([logits], renorm, PROBS_FULL, FLOAT_TOL).max_abs > 0.1
    far = [PeerStep(None, "x", [Candidate(3, "", 1.0)])]
    assert compare_topk([logits], far, PROBS_TOPK, FLOAT_TOL).outside_our_top == [(0, 3)]


def test_text_comparison_accepts_divergence_only_after_a_near_tie():
    pieces = [b"He", b"llo", b" wor", b"ld"]
    assert compare_generated_text(pieces, [1, 1, 1, 1], "length", "Hello world", "length", 0.1).equal
    assert not compare_generated_text(pieces, [1, 1, 1, 1], "stop", "Hello world", "length", 0.1).ok
    assert compare_generated_text(pieces, [1, 1, 0.01, 1], "length", "Hello there", "length", 0.1).ok
    assert not compare_generated_text(pieces, [1, 1, 1, 0.01], "length", "Hello there", "length", 0.1).ok
    assert compare_generated_text([b"ab", b"\xce"], [1, 1], "length", "ab", "length", 0.1).equal  # cut char
    assert text_agreement([b"ab", b"c", b"d"], "abcx") == 2


# ---- the pipeline on replayed, tampered and live answers -------------------------------------------------------
# prompts whose recorded answers lack entries (unfinished UTF-8 steps) and ones with all 32
@pytest.mark.parametrize("name,kind,prompts", [("tiny-bitnet", "i2_s", (2, 5, 7, 3)), ("tiny-llama", "i2_s", (0, 4))])
def test_checks_pass_on_bitnetcpp_recorded_answers(name, kind, prompts):
    ref = load_reference(name, kind)
    model = _model(name, kind)
    with RecordedServerReplay(ref) as url:
        peer = PeerClient(url)
        assert check_tokenization(peer, model, [r["prompt"] for r in ref["results"]]) == 8
        for r in [ref["results"][i] for i in prompts]:
            rep = check_completion(peer, model, r["prompt"], 32)
            assert rep.steps == 32 and rep.greedy_compared >= min(rep.near_tie_at or 32, 32)
            assert rep.topk_max_abs < 0.05


def test_checks_fail_on_a_wrong_peer():
    ref = load_reference("tiny-llama", "f32")
    model = _model("tiny-llama", "f32")
    prompt = ref["results"][2]["prompt"]  # no near-tie in its 32 steps

    def bump_tokenize(text, ids):
        return ids[:-1] + [ids[-1] + 1]

    def swap_token(text, out):
        e = out["completion_probabilities"][0]
        e["probs"][0], e["probs"][1] = e["probs"][1], e["probs"][0]
        e["content"] = e["probs"][0]["tok_str"]
        out["content"] = e["content"] + out["content"][len(e["probs"][1]["tok_str"]):]
        return out

    def skew_probs(text, out):
        p = out["completion_probabilities"][3]["probs"]
        p[0]["prob"] -= 0.02
        p[1]["prob"] += 0.02
        return out

    with RecordedServerReplay(ref, mutate_tokenize=bump_tokenize) as url:
        with pytest.raises(AssertionError, match="tokenization differs"):
            check_tokenization(PeerClient(url), model, [prompt])
    with RecordedServerReplay(ref, mutate=swap_token) as url:
        with pytest.raises(AssertionError, match="before any near-tie"):
            check_completion(PeerClient(url), model, prompt, 32)
    with RecordedServerReplay(ref, mutate=skew_probs) as url:
        with pytest.raises(AssertionError, match="probabilities off"):
            check_completion(PeerClient(url), model, prompt, 32)


def test_checks_pass_against_our_own_server_as_a_new_format_peer():
    """Our server speaks the new llama-server shapes (ids, full-vocabulary logprobs): same engine, so the
    comparison must come out (near) exact, through chat too."""
    path = str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    model = _model("tiny-bitnet", "i2_s")
    srv = LiveServer(lambda: load_ours(path))
    try:
        peer = PeerClient(srv.url)
        rep = check_completion(peer, model, "Once upon a time", 16)
        assert rep.steps == 16 and rep.greedy_compared == 16 and rep.topk_max_abs < 1e-4
        assert rep.peer_rates[1] > 0
        for messages in MULTI_TURN[:2]:
            assert check_chat(peer, model, list(messages), 16).equal
    finally:
        srv.stop()


# ---- launcher and option plumbing --------------------------------------------------------------------------------
SHIM = f"""#!{sys.executable}
# stands in for a llama-server binary: drops the llama-server flags our CLI lacks, then runs our server
import os, sys
args, skip = [], False
for a in sys.argv[1:]:
    if skip:
        skip = False
    elif a in ("-tb", "-ub"):
        skip = True
    else:
        args.append(a)
os.execv(sys.executable, [sys.executable, {str(REPO / 'serve.py')!r}, "--log-level", "warning"] + args)
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("shim") / "llama-server"
    path.write_text(SHIM)
    path.chmod(0o755)
    return str(path)


def test_launcher_starts_waits_and_stops_a_server_binary(shim, tmp_path):
    proc = LlamaServerProcess(shim, str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")), threads=1, ctx=256,
                              ubatch=1)
    with proc as peer:
        assert peer.healthy() and peer.tokenize("Hello") == _model("tiny-bitnet", "i2_s").tokenizer.encode(
            "Hello", add_bos=False)
        popen = proc.proc
    assert popen.poll() is not None and proc.proc is None  # stopped and reaped
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(ServerCannotLoad, match="not-a-model"):
        LlamaServerProcess(shim, str(bad), threads=1, startup_timeout=60).start()


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
                           str(Path(__file__).with_name("test_live_server_parity.py")), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_parity_tests_are_deselected_without_the_option():
    out = _pytest("--collect-only")
    assert out.returncode == 5 and "deselected" in out.stdout and "no tests collected" in out.stdout, out.stdout


def test_parity_option_runs_the_suite_against_a_given_url():
    ref = load_reference("tiny-bitnet", "i2_s")
    with RecordedServerReplay(ref) as url:
        out = _pytest("--parity", "--parity-url", url, "--parity-model", "tiny-bitnet/i2_s",
                      "-k", "fixture0 or fixture6")  # the replay knows only the fixtures' prompts
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout[-3000:]
    report = out.stdout[out.stdout.index("parity report"):]
    assert "tiny-bitnet/i2_s   fixture0" in report and "tiny-bitnet/i2_s   fixture6" in report, report
