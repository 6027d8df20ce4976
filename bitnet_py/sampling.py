"""Sampling parameters and the token sampler.

The sampler works on one logits row at a time (float32[n_vocab]) so a sequence's result never depends on what
else was in the batch. Order of the steps follows llama.cpp's default chain:
logit bias -> repetition / presence / frequency penalties -> (greedy if temperature == 0) -> top-k -> top-p ->
min-p -> temperature -> draw with the sequence's own numpy Generator.
Logprobs are reported from the model's raw distribution (log-softmax of the unmodified logits), as vLLM does.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
NO_SCREEN_HELP = ("keep only the f16 output head: every step computes all logits (the screened head gives greedy and "
                  "top-k requests the same tokens from half the head's bytes, for 0.33 GB more memory at 2B-4T)")
MAX_LOGIT_BIAS_ENTRIES = 1024


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingParamsError(name, f"'{name}' must be a finite number, got {value!r}")


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"'{name}' must be an integer, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Defaults are llama-server's."""

    temperature: float = 0.8          # 0 = greedy (first maximum in id order)
    top_k: int = 40                   # <= 0: disabled
    top_p: float = 0.95               # 1.0: disabled
    min_p: float = 0.05               # 0.0: disabled
    repeat_penalty: float = 1.0       # 1.0: disabled
    repeat_last_n: int = 64           # window of the penalties; -1 = whole context, 0 = disabled
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias); bias -inf bans the token
    seed: int | None = None
    logprobs: int | None = None       # None: no logprobs; N >= 0: chosen token + top-N alternatives

    def __post_init__(self) -> None:
        _check_finite("temperature", self.temperature)
        if self.temperature < 0:
            raise SamplingParamsError("temperature", "'temperature' must be >= 0")
        _check_int("top_k", self.top_k)
        _check_finite("top_p", self.top_p)
        if not 0.0 <= self.top_p <= 1.0:
            raise SamplingParamsError("top_p", "'top_p' must be in [0, 1]")
        _check_finite("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", "'min_p' must be in [0, 1]")
        _check_finite("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0:
            raise SamplingParamsError("repeat_penalty", "'repeat_penalty' must be > 0")
        _check_int("repeat_last_n", self.repeat_last_n)
        if self.repeat_last_n < -1:
            raise SamplingParamsError("repeat_last_n", "'repeat_last_n' must be >= -1")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_finite(name, value)
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"'{name}' must be in [-2, 2]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise SamplingParamsError("logit_bias", f"'logit_bias' has more than {MAX_LOGIT_BIAS_ENTRIES} entries")
        for token_id, bias in self.logit_bias:
            _check_int("logit_bias", token_id)
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
                raise SamplingParamsError("logit_bias", f"logit_bias value for {token_id} must be a number")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
                raise SamplingParamsError("logprobs", f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_context(self) -> bool:
        """The sampler reads the token history (repetition / presence / frequency penalties)."""
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)

    def check_vocab(self, n_vocab: int) -> None:
        """Token ids in logit_bias must exist in the vocabulary."""
        for token_id, _ in self.logit_bias:
            if not 0 <= token_id < n_vocab:
                raise SamplingParamsError("logit_bias", f"logit_bias token id {token_id} is outside the vocabulary "
                                                        f"(0..{n_vocab - 1})")


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of the chosen token and the top alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = field(default=())


def make_rng(seed: int | None, stream: int = 0) -> np.random.Generator:
    """Per-sequence generator: same (seed, stream) => same draws; stream separates the n choices of a request."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, stream])


def _apply_penalties(logits: np.ndarray, params: SamplingParams, context: np.ndarray) -> None:
    """In place on logits float32[V]; context int32[N] = prompt + output token ids."""
    if params.repeat_last_n == 0 or context.size == 0:
        return
    if (params.repeat_penalty == 1.0 and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return
    window = context if params.repeat_last_n < 0 else context[-params.repeat_last_n:]
    window = window[(window >= 0) & (window < logits.shape[0])]
    ids, counts = np.unique(window, return_counts=True)          # ids int[U], counts int[U]
    values = logits[ids]
    if params.repeat_penalty != 1.0:
        values = np.where(values > 0, values / params.repeat_penalty, values * params.repeat_penalty)
    values = values - counts * params.frequency_penalty - params.presence_penalty
    logits[ids] = values.astype(np.float32)


@dataclass(frozen=True)
class TopRequest:
    """What a sampler reads from one logits row: the k largest logits (k = 1: greedy) and the exact logits of
    `keep` (penalized or biased ids, whose values the sampler changes before it ranks them)."""
    k: int
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # i64[N]


def head_request(params: SamplingParams, context: np.ndarray) -> TopRequest | None:
    """Which logits of a row `sample_token` reads, for a screened head (bitnet_py.screened_head): the top k of
    the biased and penalized row (k = 1 when greedy), which are the top k of the raw row among the ids it does
    not change, plus the exact logits of the ids it changes. None: it reads the whole row (logprobs; top_k
    disabled)."""
    if params.logprobs is not None:
        return None
    k = 1 if params.greedy else params.top_k
    if k <= 0:
        return None
    keep = [np.array([token_id for token_id, _ in params.logit_bias], dtype=np.int64)]
    if params.uses_context and context.size:
        keep.append(np.asarray(context if params.repeat_last_n < 0 else context[-params.repeat_last_n:],
                               dtype=np.int64))
    return TopRequest(k, np.unique(np.concatenate(keep)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    m = np.max(x64)
    return x64 - (m + np.log(np.sum(np.exp(x64 - m))))


def _top_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, best first, ties broken by lower id."""
    n = logits.shape[0]
    if 0 < k < n:
        ids = np.argpartition(logits, n - k)[n - k:]
        # argpartition may cut through a tie at the k-th value: take every id tied with the cut value, then trim
        cut = logits[ids].min()
        ids = np.flatnonzero(logits >= cut)
    else:
        ids = np.arange(n)
    order = np.lexsort((ids, -logits[ids]))
    return ids[order][: k if 0 < k < n else n]


def compute_logprobs(raw_logits: np.ndarray, token_id: int, n_top: int) -> TokenLogprob:
    logp = _log_softmax(raw_logits)
    top: tuple[tuple[int, float], ...] = ()
    if n_top > 0:
        ids = _top_candidates(raw_logits, n_top)
        top = tuple((int(i), float(logp[i])) for i in ids)
    return TokenLogprob(token_id=int(token_id), logprob=float(logp[token_id]), top=top)


def sample_token(raw_logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                 context: np.ndarray) -> tuple[int, TokenLogprob | None]:
    """Pick the next token from raw_logits float32[V] (not modified); context int32[N] = tokens so far."""
    if params.logit_bias or params.uses_context or raw_logits.dtype != np.float32:
        logits = np.array(raw_logits, dtype=np.float32, copy=True)   # [V], modified below
        for token_id, bias in params.logit_bias:
            logits[token_id] += np.float32(bias)
        _apply_penalties(logits, params, context)
    else:
        logits = raw_logits                                          # [V], only read

    if params.greedy:
        token = int(np.argmax(logits))          # first maximum in id order
    else:
        token = _sample_stochastic(logits, params, rng)
    info = compute_logprobs(raw_logits, token, params.logprobs) if params.logprobs is not None else None
    return token, info


def _sample_stochastic(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    ids = _top_candidates(logits, params.top_k)          # int[C], best first
    cand = logits[ids].astype(np.float64)                 # [C]
    finite = np.isfinite(cand)
    if not finite.any():
        return int(ids[0])
    ids, cand = ids[finite], cand[finite]
    probs = np.exp(cand - cand[0])
    probs /= probs.sum()
    keep = ids.shape[0]
    if params.top_p < 1.0:
        cum = np.cumsum(probs)
        keep = min(keep, int(np.searchsorted(cum, params.top_p, side="left")) + 1)
    if params.min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(probs >= params.min_p * probs[0]))))
    keep = max(1, keep)
    ids, cand = ids[:keep], cand[:keep]
    with np.errstate(over="ignore"):        # a tiny temperature sends all but the best to -inf: weight 0
        scaled = (cand - cand[0]) / params.temperature
    weights = np.exp(scaled)
    cum = np.cumsum(weights)
    u = rng.random() * cum[-1]
    pick = min(int(np.searchsorted(cum, u, side="right")), keep - 1)
    return int(ids[pick])
