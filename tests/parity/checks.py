"""The parity checks, one function per kind of comparison: peer (llama-server-compatible HTTP) vs our engine.

Each raises AssertionError with the evidence when the two disagree beyond the tolerance, and returns a small
report (numbers for the summary table and the timing line) when they agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bitnet_py.model import Model

from .compare import (compare_generated_text, compare_greedy, compare_topk, first_difference, incomplete_utf8_tail,
                      label_index, pick_id, tolerance_for, trusted_prefix)
from .ours import greedy_run, is_ternary, teacher_forced
from .peer import PeerClient, PeerCompletion, PeerStep


def check_tokenization(peer: PeerClient, model: Model, texts: list[str]) -> int:
    """/tokenize (no BOS, special tokens parsed) vs ours; -> number of texts compared."""
    tok = model.tokenizer
    bad = []
    for text in texts:
        theirs = peer.tokenize(text)
        ours = tok.encode(text, add_bos=False, parse_special=True)
        at = first_difference(ours, theirs)
        if at is not None:
            bad.append(f"{text[:40]!r}: first difference at {at}: ours {ours[at:at + 5]} theirs {theirs[at:at + 5]}")
    assert not bad, "tokenization differs:\n" + "\n".join(bad)
    return len(texts)


def peer_margins(steps: list[PeerStep]) -> np.ndarray:
    """top1 - top2 logit of each step, from the peer's own probabilities (ln p1/p2 holds for both the full and
    the renormalized softmax); inf where fewer than two candidates are listed."""
    out = []
    for s in steps:
        p = sorted((c.prob for c in s.top), reverse=True)
        out.append(math.log(p[0] / p[1]) if len(p) >= 2 and p[1] > 0 else math.inf)
    return np.array(out, dtype=np.float64)


@dataclass
class CompletionReport:
    prompt_tokens: int
    steps: int
    greedy_compared: int
    near_tie_at: int | None
    topk_max_abs: float
    ours_rates: tuple[float, float]  # prefill, decode tok/s
    peer_rates: tuple[float, float]


def check_completion(peer: PeerClient, model: Model, prompt: str, n_predict: int = 32, ubatch: int = 512,
                     n_probs: int = 5) -> CompletionReport:
    """Greedy continuation (ids until the first near-tie; as text where the peer gives no ids) and the
    top-n_probs probabilities along the peer's own continuation (teacher forcing: same context on both sides)."""
    tol = tolerance_for(is_ternary(model))
    tok = model.tokenizer
    prompt_ids = tok.encode(prompt, parse_special=True)
    pc = peer.completion(prompt, n_predict, n_probs)
    assert pc.steps, f"peer returned no completion_probabilities for {prompt[:40]!r}"
    if pc.n_evaluated:
        assert pc.n_evaluated == len(prompt_ids), \
            f"peer evaluated {pc.n_evaluated} prompt tokens, we tokenize {len(prompt_ids)}"
    n_steps = len(pc.ids) if pc.ids is not None else max(pc.n_predicted, len(pc.steps))
    forced, aligned = follow_peer(model, prompt_ids, pc, n_steps, ubatch)
    ours = greedy_run(model, prompt_ids, n_predict, ubatch)
    margin = ours.step_margins[:n_steps].astype(np.float64)
    for i, step in aligned:
        margin[i] = min(margin[i], peer_margins([step])[0])
    if pc.ids is not None:
        greedy = compare_greedy(ours.ids, margin, pc.ids, tol.near_tie)
        assert greedy.ok, (f"{prompt[:40]!r}: greedy ids differ at step {greedy.mismatch} before any near-tie: "
                           f"ours {ours.ids[:greedy.compared]} peer {pc.ids[:greedy.compared]}")
        compared, near_tie = greedy.compared, greedy.near_tie_at
    else:  # old server: no ids, compare the text token by token
        rep = compare_generated_text(ours.pieces[:n_steps], margin, "", pc.content, "", tol.near_tie)
        assert rep.ok, f"{prompt[:40]!r}: {rep.reason}"
        near_tie = trusted_prefix(margin, tol.near_tie)
        compared = n_steps if rep.equal else near_tie
        near_tie = near_tie if near_tie < n_steps else None
    # teacher forcing is exact up to where our reading of the peer's tokens reproduces its text
    good = n_steps if pc.ids is not None else text_agreement(forced.pieces, pc.content)
    used = [(i, st) for i, st in aligned if i < good]
    index = label_index(tok) if pc.ids is None else None
    topk = compare_topk([forced.step_logits[i] for i, _ in used], [st for _, st in used], pc.prob_kind, tol, index)
    assert topk.max_abs <= tol.probs, (f"{prompt[:40]!r}: top-{n_probs} probabilities off by {topk.max_abs:.3g} "
                                       f"at entry {topk.worst_step}")
    assert not topk.outside_our_top, f"{prompt[:40]!r}: peer's top-k holds tokens we rank far lower: " \
                                     f"{topk.outside_our_top[:5]}"
    t = pc.timings
    return CompletionReport(len(prompt_ids), n_steps, compared, near_tie, topk.max_abs, ours.rates(len(prompt_ids)),
                            (float(t.get("prompt_per_second") or 0.0), float(t.get("predicted_per_second") or 0.0)))


def follow_peer(model: Model, prompt_ids: list[int], pc: PeerCompletion, n_steps: int, ubatch: int):
    """Our logits along the peer's continuation, and which of its probability entries belongs to which step.
    With ids (new servers) the tokens are known. The old server gives none and drops the entry of every step that
    leaves a multi-byte character unfinished (incomplete_utf8_tail): there a step with an entry takes the token
    its label names; a step without one takes our greedy choice (the peer is greedy on the same context)."""
    tok = model.tokenizer
    index = label_index(tok) if pc.ids is None else None
    every_step = len(pc.steps) >= n_steps
    state = {"text": b"", "entry": 0}
    aligned: list[tuple[int, PeerStep]] = []

    def next_id(i: int, logits: np.ndarray) -> int:
        j = state["entry"]
        if pc.ids is not None:
            t = int(pc.ids[i])
        else:
            t = int(np.argmax(logits))
            has_entry = every_step or not incomplete_utf8_tail(state["text"] + tok.token_bytes(t))
            if has_entry and j < len(pc.steps):
                t = pick_id(pc.steps[j].label, index, logits)
        state["text"] += tok.token_bytes(t)
        if j < len(pc.steps) and (every_step or not incomplete_utf8_tail(state["text"])):
            aligned.append((i, pc.steps[j]))
            state["entry"] = j + 1
        return t

    run = teacher_forced(model, prompt_ids, next_id, n_steps, ubatch)
    run.pieces = [tok.token_bytes(t) for t in run.ids]
    return run, aligned


def text_agreement(pieces: list[bytes], content: str) -> int:
    """Number of leading steps whose text (as the peer prints it) agrees with the peer's content."""
    for i in range(len(pieces)):
        text = b"".join(pieces[:i + 1]).decode("utf-8", errors="replace").rstrip("\ufffd")
        if not content.startswith(text):
            return i
    return len(pieces)


@dataclass
class ChatReport:
    equal: bool
    note: str


def check_chat(peer: PeerClient, model: Model, messages: list[dict], max_tokens: int = 32,
               ubatch: int = 512) -> ChatReport:
    """/v1/chat/completions text and finish_reason vs our greedy run on our own rendering of the messages."""
    tol = tolerance_for(is_ternary(model))
    tok = model.tokenizer
    ids = model.chat_template.encode(list(messages))
    theirs = peer.chat(list(messages), max_tokens)
    if theirs.prompt_tokens is not None:
        assert theirs.prompt_tokens == len(ids), (
            f"chat prompt: peer counts {theirs.prompt_tokens} tokens, we {len(ids)} (template or tokenization "
            f"differ; ours renders {model.chat_template.render(list(messages))!r})")
    run = greedy_run(model, ids, max_tokens, ubatch, stop_ids=tok.stop_ids)
    stopped = bool(run.ids) and run.ids[-1] in tok.stop_ids
    pieces = run.pieces[:-1] if stopped else run.pieces
    rep = compare_generated_text(pieces, run.step_margins, "stop" if stopped else "length", theirs.content,
                                 theirs.finish_reason, tol.near_tie)
    assert rep.ok, f"chat {messages[-1]['content'][:30]!r}: {rep.reason}"
    return ChatReport(rep.equal, rep.reason)
