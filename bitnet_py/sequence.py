"""One generated sequence (a request with n choices has n of them), its stop rules and the events it emits.

Token bookkeeping: `token_ids` holds prompt + generated ids; `num_computed` of them have K/V in the cache.
Each engine step feeds `token_ids[num_computed : num_computed + chunk]`; when the chunk reaches the end of
`token_ids` the step's logits sample the next token. Decoding is the case where one token is left.
"""
from __future__ import annotations

import enum
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bitnet_py.sampling import SamplingParams, TokenLogprob, make_rng

logger = logging.getLogger(__name__)

_seq_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"            # end-of-generation token or stop string
    LENGTH = "length"        # max_tokens or context full
    CANCELLED = "cancelled"  # client went away
    ERROR = "error"          # the engine failed on this sequence
    SHUTDOWN = "shutdown"    # cut by a graceful server stop (reported to clients as "length")


@dataclass
class SeqEvent:
    """What the engine reports to a request handler after a step (sent through a thread-safe callback)."""

    request_id: str
    index: int                                   # choice index within the request
    text: str = ""                               # new text (stop strings and held-back prefixes excluded)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_type: str | None = None                 # llama-server style: "eos", "word", "limit"
    stopping_word: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    slot: int = -1
    error: str | None = None


class StopStringMatcher:
    """Cuts generated text at the first stop string; holds back a tail that could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""          # everything generated so far
        self.emitted = 0        # len of the prefix of `text` already handed out
        self.matched: str | None = None

    def push(self, delta: str) -> str:
        """Add decoded text; return the part that is safe to emit now."""
        if self.matched is not None:
            return ""
        self.text += delta
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out
        longest = max(len(s) for s in self.stops)
        search_from = max(0, self.emitted - longest + 1)
        cut = -1
        for stop in self.stops:
            i = self.text.find(stop, search_from)
            if i >= 0 and (cut < 0 or i < cut):
                cut, self.matched = i, stop
        if cut >= 0:
            cut = max(cut, self.emitted)
            out = self.text[self.emitted:cut]
            self.text = self.text[:cut]
            self.emitted = cut
            return out
        hold = self._held_tail()
        end = len(self.text) - hold
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def _held_tail(self) -> int:
        """Length of the longest suffix of the unemitted text that is a proper prefix of a stop string."""
        pending = self.text[self.emitted:]
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(pending)), best, -1):
                if pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """End of generation: the held-back tail is ordinary text after all."""
        if self.matched is not None:
            return ""
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class Sequence:
    """State of one choice of one request. Owned by the engine thread."""

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams, *,
                 max_tokens: int | None, stop: tuple[str, ...], stop_ids: frozenset[int],
                 detokenizer, emit: Callable[[SeqEvent], None], arrival: float | None = None,
                 use_prefix_cache: bool = True) -> None:
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.use_prefix_cache = use_prefix_cache
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.emit = emit
        self.detokenizer = detokenizer
        self.stopper = StopStringMatcher(stop)
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed = 0
        self.num_cached_tokens = 0            # prompt tokens whose KV came from the prefix cache
        self.block_table: list[int] = []      # physical KV block ids, in position order
        self.num_hashed_blocks = 0            # leading full blocks registered in the prefix cache
        self.block_hashes: list[int] = []     # chain hash of each registered block
        self.status = SeqStatus.WAITING
        self.slot = -1
        self.rng = make_rng(params.seed, index)
        self.finish_reason: FinishReason | None = None
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.first_scheduled: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished_at: float | None = None
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed == 1 and self.num_output_tokens > 0

    def context_array(self) -> np.ndarray:
        return np.asarray(self.token_ids, dtype=np.int32)   # int32[N]

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, computed={self.num_computed}, "
                f"status={self.status.value})")


class _Utf8Detokenizer:
    """Fallback incremental detokenizer over Tokenizer.token_bytes (used when bitnet_py.detokenizer is absent)."""

    def __init__(self, tokenizer) -> None:
        import codecs
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def make_detokenizer(tokenizer):
    try:
        from bitnet_py.detokenizer import IncrementalDetokenizer
    except ModuleNotFoundError as exc:
        if exc.name != "bitnet_py.detokenizer":
            raise
        return _Utf8Detokenizer(tokenizer)
    return IncrementalDetokenizer(tokenizer)
