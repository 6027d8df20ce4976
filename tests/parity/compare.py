"""Comparison functions of the parity suite: pure functions over ids, logits and the peer's answers.

Tolerances (docs/parity.md explains them):
- float files (F32/F16 matrices, no activation quantization): float-order differences only; bitnet.cpp's
  recorded logits and upstream llama.cpp's agree with ours to a few 1e-3, so 1e-2 on logits.
- ternary files (I2_S, TL2, TQ1_0, TQ2_0): every linear quantizes its input to int8; a 1e-6 difference can move a
  code across a rounding boundary and the flip propagates, so logits of faithful implementations differ by up to
  ~0.3 on some prompts: 0.5 on logits.
- Greedy ids: equal up to (excluding) the first step whose top1-top2 logit margin is below NEAR_TIE (a near-tie
  that such differences may legitimately swap).
- Probabilities: |dp| <= |dlogit| / 2 for a softmax, so half the logit tolerance.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .peer import PROBS_FULL, PROBS_TOPK, PeerStep

NEAR_TIE = 0.1


@dataclass(frozen=True)
class Tolerance:
    logits: float
    probs: float
    near_tie: float = NEAR_TIE


FLOAT_TOL = Tolerance(logits=1e-2, probs=5e-3)
TERNARY_TOL = Tolerance(logits=0.5, probs=0.25)


def tolerance_for(quantized: bool) -> Tolerance:
    return TERNARY_TOL if quantized else FLOAT_TOL


# ---- tokens and labels ----------------------------------------------------------------------------------------
def first_difference(a: list, b: list) -> int | None:
    """Index of the first differing element (len of the shorter if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def old_server_label(raw: bytes) -> str:
    """How the old llama-server prints a token in completion_probabilities: a lone byte >= 0x80 as
    "byte: \\xNN", anything else as its UTF-8 text (invalid sequences replaced by U+FFFD when JSON-encoded)."""
    if len(raw) == 1 and raw[0] & 0x80:
        return f"byte: \\x{raw[0]:02x}"
    return raw.decode("utf-8", errors="replace")


def incomplete_utf8_tail(text: bytes) -> bool:
    """The old llama-server's test for a multi-byte character cut off at the end of the generated text (it keeps
    no probability entry for a step that leaves the text so): from the end, skip continuation bytes; the first
    other byte decides."""
    for i in range(1, min(4, len(text)) + 1):
        c = text[-i]
        if c & 0xC0 == 0x80:
            continue
        if c & 0xE0 == 0xC0:
            return i < 2
        if c & 0xF0 == 0xE0:
            return i < 3
        if c & 0xF8 == 0xF0:
            return i < 4
        return False
    return False


def label_index(tokenizer) -> dict[str, list[int]]:
    """old-server label -> token ids carrying it (usually one)."""
    index: dict[str, list[int]] = {}
    for t in range(tokenizer.vocab_size):
        index.setdefault(old_server_label(tokenizer.token_bytes(t)), []).append(t)
    return index


def pick_id(label: str, index: dict[str, list[int]], logits: np.ndarray, taken: set[int] = frozenset()) -> int:
    """The id a label stands for; among several ids with that label, the one our logits rank highest."""
    ids = [t for t in index.get(label, []) if t not in taken]
    if not ids:
        raise KeyError(f"no token in our vocabulary prints as {label!r}")
    return max(ids, key=lambda t: (logits[t], -t))


# ---- logits ---------------------------------------------------------------------------------------------------
def margins(logits: np.ndarray) -> np.ndarray:
    """top1 - top2 logit of each row: f32[T, V] -> f32[T]."""
    part = np.partition(np.atleast_2d(logits), -2, axis=-1)
    return part[:, -1] - part[:, -2]


def trusted_prefix(step_margins, threshold: float) -> int:
    """Number of leading steps before the first near-tie."""
    for i, m in enumerate(step_margins):
        if m < threshold:
            return i
    return len(step_margins)


@dataclass
class GreedyReport:
    compared: int  # steps compared (before the first near-tie and within both runs)
    mismatch: int | None  # first differing step among the compared ones
    near_tie_at: int | None  # step of the first near-tie, if any

    @property
    def ok(self) -> bool:
        return self.mismatch is None


def compare_greedy(ours: list[int], our_margins, theirs: list[int], threshold: float) -> GreedyReport:
    """Free-running greedy ids. Up to the first step whose margin (ours, on the same context) is below the
    threshold both must pick the same token."""
    n_trusted = trusted_prefix(our_margins, threshold)
    n = min(n_trusted, len(ours), len(theirs))
    return GreedyReport(n, first_difference(ours[:n], theirs[:n]),
                        n_trusted if n_trusted < len(our_margins) else None)


@dataclass
class LogitsReport:
    max_abs: float
    worst_row: int
    argmax_disagree: list[int]  # rows whose argmax differs although our margin is >= the near-tie threshold
    row_max: np.ndarray = field(repr=False)


def compare_logits(ours: np.ndarray, theirs: np.ndarray, threshold: float) -> LogitsReport:
    """Full-vocabulary logits, f32[T, V] each (every position, or every generation step)."""
    ours, theirs = np.atleast_2d(ours), np.atleast_2d(theirs)
    if ours.shape != theirs.shape:
        raise ValueError(f"logit shapes differ: ours {ours.shape}, theirs {theirs.shape}")
    row_max = np.abs(ours.astype(np.float64) - theirs).max(axis=1)
    m = margins(ours)
    bad = [int(i) for i in np.flatnonzero((ours.argmax(1) != theirs.argmax(1)) & (m >= threshold))]
    worst = int(row_max.argmax())
    return LogitsReport(float(row_max[worst]), worst, bad, row_max)


# ---- top-k probabilities --------------------------------------------------------------------------------------
def probs_like_peer(logits: np.ndarray, ids: list[int], kind: str) -> np.ndarray:
    """Our probabilities of `ids` computed the way the peer computed its list: a softmax over the whole
    vocabulary (PROBS_FULL), or over the listed candidates only (PROBS_TOPK: old llama-server at temperature 0)."""
    x = logits.astype(np.float64)
    if kind == PROBS_TOPK:
        sel = x[ids]
        e = np.exp(sel - sel.max())
        return e / e.sum()
    if kind == PROBS_FULL:
        e = np.exp(x - x.max())
        return e[ids] / e.sum()
    raise ValueError(f"unknown probability kind {kind!r}")


@dataclass
class TopkReport:
    max_abs: float = 0.0
    worst_step: int = -1
    outside_our_top: list[tuple[int, int]] = field(default_factory=list)  # (step, id): listed by the peer but
    # ranked by us below our k-th best by more than the logit tolerance


def compare_topk(step_logits: list[np.ndarray], peer_steps: list[PeerStep], kind: str, tol: Tolerance,
                 index: dict[str, list[int]] | None = None) -> TopkReport:
    """The peer's top-k list at each step vs our probabilities of the same tokens at the same context.
    `step_logits[i]` must be ours after the peer's own tokens 0..i-1 (teacher forcing). `index` maps old-server
    labels to ids (needed when the peer gives no ids)."""
    rep = TopkReport()
    for i, (logits, step) in enumerate(zip(step_logits, peer_steps)):
        ids: list[int] = []
        for c in step.top:
            if c.id is not None:
                ids.append(int(c.id))
            else:
                ids.append(pick_id(c.label, index or {}, logits, set(ids)))
        if not ids:
            continue
        theirs = np.array([c.prob for c in step.top])
        diff = np.abs(probs_like_peer(logits, ids, kind) - theirs).max()
        if diff > rep.max_abs:
            rep.max_abs, rep.worst_step = float(diff), i
        kth = np.sort(logits)[-len(ids)]
        rep.outside_our_top += [(i, t) for t in ids if logits[t] < kth - tol.logits]
    return rep


# ---- chat text ------------------------------------------------------------------------------------------------
@dataclass
class TextReport:
    equal: bool
    ok: bool
    reason: str


def compare_generated_text(ours_pieces: list[bytes], our_margins, ours_finish: str, theirs_text: str,
                           theirs_finish: str, threshold: float) -> TextReport:
    """Our greedy generation (pieces of each step and its margin) vs the peer's text for the same prompt.
    Equal text must come with the same finish_reason. Different text is acceptable only when it starts inside
    or after the first step whose margin is a near-tie (where both sides legitimately may pick another token)."""
    ours_text = b"".join(ours_pieces).decode("utf-8", errors="replace")
    if ours_text.rstrip("\ufffd") == theirs_text.rstrip("\ufffd"):  # a cut multi-byte character at the end
        same = ours_finish == theirs_finish
        return TextReport(True, same, "" if same else f"finish_reason {ours_finish!r} vs {theirs_finish!r}")
    at = first_difference(list(ours_text), list(theirs_text)) or 0
    step = len(ours_pieces)  # the first step after which our text covers the first differing character
    for i in range(len(ours_pieces)):
        text_i = b"".join(ours_pieces[:i + 1]).decode("utf-8", errors="replace")
        if len(os.path.commonprefix([text_i, ours_text])) > at:
            step = i
            break
    n_trusted = trusted_prefix(our_margins, threshold)
    if step >= n_trusted:
        return TextReport(False, True, f"texts differ from step {step}, after the near-tie at step {n_trusted}")
    return TextReport(False, False, f"texts differ at character {at} (step {step}) before any near-tie "
                                    f"(first at {n_trusted}): ours {ours_text!r} vs theirs {theirs_text!r}")
