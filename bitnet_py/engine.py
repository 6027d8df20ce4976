"""The inference engine: one thread that owns the model, the KV cache and all mutable serving state.

Request handlers call `submit` (validated, bounded, thread safe) and `cancel`; results come back through the
`emit` callback they pass (called on the engine thread: hand it to your event loop with
`loop.call_soon_threadsafe`). Every step the scheduler plans one batch — one token for every decoding
sequence plus prompt chunks — and the engine runs ONE `model.forward`, samples, detokenizes and emits.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bitnet_py.block_manager import BlockManager
from bitnet_py.metrics import Metrics
from bitnet_py.sampling import SamplingParams, SamplingParamsError, TopRequest, head_request, sample_token
from bitnet_py.scheduler import Scheduler, build_batch, make_batch
from bitnet_py.sequence import FinishReason, SeqEvent, Sequence, SeqStatus, make_detokenizer

logger = logging.getLogger(__name__)

MAX_CTX_DEFAULT = 8192
_NO_CONTEXT = np.zeros(0, dtype=np.int32)     # int32[0]: sampling without penalties needs no token history


class EngineError(Exception):
    """A request the engine refuses; the server maps it to an HTTP error."""

    status = 400
    err_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.retry_after = retry_after


class EngineNotReady(EngineError):
    status = 503
    err_type = "unavailable_error"


class QueueFull(EngineError):
    status = 503
    err_type = "unavailable_error"


class InvalidRequest(EngineError):
    status = 400


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 8            # --parallel: sequences decoded together
    max_queue: int = 64              # sequences allowed to wait beyond the running ones
    ctx_size: int | None = None      # max tokens per sequence (None: model's, capped at 8192)
    kv_cache_tokens: int | None = None   # KV pool size in tokens (None: automatic)
    block_size: int = 16
    prefill_chunk: int = 256         # prompt tokens per step across sequences
    enable_prefix_cache: bool = True
    warmup: bool = True
    threads: int | None = None       # numba threads of the engine thread (numba's setting is per thread)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "block_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.max_queue < 0:
            raise ValueError("EngineConfig.max_queue must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("EngineConfig.threads must be >= 1")
        for name in ("ctx_size", "kv_cache_tokens"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"EngineConfig.{name} must be >= 2")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    use_prefix_cache: bool = True    # llama-server's cache_prompt
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class Engine:
    def __init__(self, loader: Callable[[], Any], config: EngineConfig | None = None,
                 metrics: Metrics | None = None, model_name: str = "model") -> None:
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics(model_name)
        self.model_name = model_name
        self._loader = loader
        self.state = "loading"           # loading -> ready | failed; -> stopped
        self.load_error: str | None = None
        self.model = None
        self.tokenizer = None
        self.chat_template = None
        self.max_model_len = 0
        self.n_vocab = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[list[Sequence]] = deque()
        self._cancelled: set[str] = set()
        self._in_system = 0              # submitted, not yet finished sequences
        self._stopping = False
        self._drain_deadline: float | None = None     # set by drain(): refuse new work, cut the rest then
        self._thread: threading.Thread | None = None
        self._requests: dict[str, list[Sequence]] = {}    # engine thread only
        self._stats: dict[str, Any] = {}
        self.ready_event = threading.Event()
        # probes for tests and /slots: accepted sequences, engine steps, (request id, step at cancel(), step freed)
        self.num_submitted = 0
        self.num_steps = 0
        self._cancel_requested: dict[str, int] = {}
        self.cancel_log: deque[tuple[str, int, int]] = deque(maxlen=256)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="bitnet-engine", daemon=True)
        self._thread.start()

    def drain(self, grace: float) -> None:
        """Graceful stop (SIGTERM): refuse new requests from now on; sequences still running after `grace`
        seconds are ended with finish reason "shutdown" (their streams get a final chunk). Any thread."""
        with self._wake:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + max(0.0, grace)
                logger.info("draining: no new requests; %d in flight get %.1f s to finish", self._in_system, grace)
            self._wake.notify_all()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _thread_main(self) -> None:
        try:
            self._set_threads()
            self._load()
        except Exception as exc:      # noqa: BLE001 - reported through /health and the log
            logger.error("model load failed: %s: %s", type(exc).__name__, exc)
            logger.debug("model load traceback", exc_info=True)
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            self.ready_event.set()
            return
        self.state = "ready"
        self.ready_event.set()
        logger.info("engine ready: ctx %d tokens/sequence, KV pool %d blocks x %d, parallel %d, queue %d",
                    self.max_model_len, self.blocks.n_blocks, self.blocks.block_size, self.config.max_num_seqs,
                    self.config.max_queue)
        try:
            self._loop()
        finally:
            self._abort_all("server shutting down")
            self.state = "stopped"

    def _set_threads(self) -> None:
        """numba.set_num_threads is thread local: set it on the thread that runs the kernels."""
        if self.config.threads is None:
            return
        import numba
        numba.set_num_threads(min(self.config.threads, numba.config.NUMBA_NUM_THREADS))

    def _load(self) -> None:
        t0 = time.perf_counter()
        model = self._loader()
        cfg = self.config
        mcfg = model.config
        self.n_vocab = int(mcfg.n_vocab)
        train_ctx = int(getattr(mcfg, "n_ctx_train", 0) or MAX_CTX_DEFAULT)
        self.max_model_len = int(cfg.ctx_size) if cfg.ctx_size else min(train_ctx, MAX_CTX_DEFAULT)
        positions = getattr(model, "max_positions", None)
        if positions is not None and self.max_model_len > positions:
            logger.warning("--ctx-size %d is beyond the model's %d positions; using %d", self.max_model_len,
                           positions, positions)
            self.max_model_len = int(positions)
        if self.max_model_len < 2:
            raise ValueError(f"context size {self.max_model_len} is too small")
        pool_tokens = cfg.kv_cache_tokens or min(self.max_model_len * cfg.max_num_seqs,
                                                 max(self.max_model_len, 16384))
        pool_tokens = max(pool_tokens, self.max_model_len)
        n_blocks = -(-pool_tokens // cfg.block_size)
        self.kv = model.new_kv_cache(n_blocks, cfg.block_size)
        self.blocks = BlockManager(n_blocks, cfg.block_size, cfg.enable_prefix_cache)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.prefill_chunk)
        self.tokenizer = getattr(model, "tokenizer", None)
        self.chat_template = getattr(model, "chat_template", None)
        self.model = model
        if cfg.warmup:
            self._warmup()
        logger.info("model loaded and warmed up in %.1f s", time.perf_counter() - t0)

    def _warmup(self) -> None:
        """Compile the kernels for prefill, mixed and decode batches before declaring readiness."""
        tok = int(getattr(self.tokenizer, "bos_id", None) or 0)
        if self.blocks.n_blocks < 2:
            return
        tables = [[0], [1]]
        # two-token prefill of one sequence next to a one-token decode of another, then a lone decode; a screened
        # and a full logits row (the head's two paths), then a top-k row
        self.model.forward(make_batch([tok, tok, tok], [0, 1, 0], [0, 0, 1], tables, [1, 2]), self.kv,
                           [TopRequest(1), None])
        self.model.forward(make_batch([tok], [2], [0], tables[:1], [0]), self.kv, [TopRequest(40)])

    # ---- API for request handlers (any thread) ------------------------------------------------------------
    def submit(self, req: GenerationRequest, emit: Callable[[SeqEvent], None]) -> str:
        """Queue a request; raises EngineError (not ready, queue full, invalid). Returns its request id."""
        if self.state != "ready":
            raise EngineNotReady("Loading model" if self.state == "loading" else f"Engine {self.state}",
                                 retry_after=5)
        self._validate(req)
        seqs = []
        stop_ids = frozenset() if req.ignore_eos else frozenset(getattr(self.tokenizer, "stop_ids", ()) or ())
        for i in range(req.n):
            seqs.append(Sequence(req.request_id, i, req.prompt_ids, req.params, max_tokens=req.max_tokens,
                                 stop=req.stop, stop_ids=stop_ids, detokenizer=make_detokenizer(self.tokenizer),
                                 emit=emit, use_prefix_cache=req.use_prefix_cache))
        with self._wake:
            if self._stopping or self._drain_deadline is not None:
                self.metrics.on_rejected("shutting_down")
                raise EngineNotReady("Server is shutting down", retry_after=5)
            limit = self.config.max_num_seqs + self.config.max_queue
            if self._in_system + req.n > limit:
                self.metrics.on_rejected("queue_full")
                raise QueueFull(f"Server busy: {self._in_system} sequences in flight (limit {limit}); retry later",
                                retry_after=1)
            self._in_system += req.n
            self.num_submitted += req.n
            self._inbox.append(seqs)
            self._wake.notify()
        return req.request_id

    def _validate(self, req: GenerationRequest) -> None:
        if not req.prompt_ids:
            raise InvalidRequest("The prompt is empty (no tokens)", "prompt")
        if req.n < 1:
            raise InvalidRequest("'n' must be >= 1", "n")
        if req.n > self.config.max_num_seqs + self.config.max_queue:
            raise InvalidRequest(f"'n' = {req.n} exceeds the server's capacity", "n")
        ids = np.asarray(req.prompt_ids)
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.n_vocab:
            raise InvalidRequest(f"Prompt token ids must be integers in [0, {self.n_vocab})", "prompt")
        if len(req.prompt_ids) >= self.max_model_len:
            raise InvalidRequest(f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                 f"has {len(req.prompt_ids)} tokens", "prompt")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise InvalidRequest("'max_tokens' must be >= 1", "max_tokens")
        try:
            req.params.check_vocab(self.n_vocab)
        except SamplingParamsError as exc:
            raise InvalidRequest(str(exc), exc.param) from None

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone); its KV blocks are freed at the start of the next step."""
        with self._wake:
            self._cancelled.add(request_id)
            self._cancel_requested.setdefault(request_id, self.num_steps)
            self._wake.notify()

    def stats(self) -> dict[str, Any]:
        """Snapshot for probes, /slots and tests (updated by the engine thread after every step)."""
        with self._lock:
            return dict(self._stats, in_system=self._in_system, submitted=self.num_submitted, steps=self.num_steps,
                        cancel_log=list(self.cancel_log), draining=self.draining)

    # ---- engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self._cancelled \
                        and not self.scheduler.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
                inbox, self._inbox = list(self._inbox), deque()
                cancelled, self._cancelled = self._cancelled, set()
                requested = {rid: self._cancel_requested.pop(rid, self.num_steps) for rid in cancelled}
                deadline = self._drain_deadline
            try:
                self._iteration(inbox, requested, deadline)
            except Exception:         # noqa: BLE001 - never let the engine thread die: fail what is in flight
                logger.exception("engine step failed; ending the sequences in flight")
                self._fail_in_flight("internal error")
            self._publish_stats()

    def _iteration(self, inbox: list[list[Sequence]], cancelled: dict[str, int], deadline: float | None) -> None:
        for seqs in inbox:
            self._requests[seqs[0].request_id] = seqs
            for seq in seqs:
                self.scheduler.add(seq)
        for rid, step in cancelled.items():
            seqs = self._requests.get(rid, ())
            for seq in seqs:
                if seq.status != SeqStatus.FINISHED:
                    self._finish(seq, FinishReason.CANCELLED, notify=False)
            if seqs:
                self.cancel_log.append((rid, step, self.num_steps))
        if deadline is not None:             # draining: nothing new starts; queued requests are answered now
            for seq in [s for s in self.scheduler.waiting if s.num_output_tokens == 0]:
                self._finish(seq, FinishReason.SHUTDOWN, stop_type="limit")
        if deadline is not None and time.monotonic() >= deadline:
            for seqs in list(self._requests.values()):
                for seq in seqs:
                    if seq.status != SeqStatus.FINISHED:
                        event = SeqEvent(seq.request_id, seq.index, text=self._flush_text(seq))
                        self._finish(seq, FinishReason.SHUTDOWN, event=event, stop_type="limit")
        if self.scheduler.has_work():
            self._step()

    def _fail_in_flight(self, message: str) -> None:
        for seqs in list(self._requests.values()):
            for seq in seqs:
                if seq.status != SeqStatus.FINISHED:
                    try:
                        self._finish(seq, FinishReason.ERROR, error=message)
                    except Exception:     # noqa: BLE001
                        logger.exception("could not finish %s", seq.request_id)
                        seq.status = SeqStatus.FINISHED

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        for seq in plan.out_of_memory:
            self._finish(seq, FinishReason.LENGTH, stop_type="limit")
        if not plan.chunks:
            if self.scheduler.waiting and not self.scheduler.running:
                # cannot happen with a pool >= ctx_size; guard against a spin
                seq = self.scheduler.waiting[0]
                self._finish(seq, FinishReason.ERROR, error="KV cache too small for this prompt")
            return
        now = time.perf_counter()
        for chunk in plan.chunks:
            if chunk.seq.first_scheduled is None:
                chunk.seq.first_scheduled = now
                self.metrics.on_queued(now - chunk.seq.arrival)
        batch, sample_rows = build_batch(plan, self.blocks.block_size)
        sampled = [c for c in plan.chunks if c.sample]
        contexts = [self._context(c.seq) for c in sampled]  # what each sampler reads, once per step
        heads = [head_request(c.seq.params, ctx) for c, ctx in zip(sampled, contexts)]
        try:
            logits = self.model.forward(batch, self.kv, heads)       # float32[R, n_vocab]
        except Exception as exc:      # noqa: BLE001 - fail this batch's sequences, keep serving
            logger.exception("model.forward failed on a batch of %d tokens", len(batch.tokens))
            for chunk in plan.chunks:
                self._finish(chunk.seq, FinishReason.ERROR, error=f"internal error: {type(exc).__name__}")
            return
        self.num_steps += 1
        n_prompt = n_generated = 0
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.num_output_tokens == 0 or chunk.length > 1:
                n_prompt += chunk.length
            seq.num_computed += chunk.length
            self.blocks.register_computed(seq)
        for chunk, row, context in zip(sampled, sample_rows, contexts):
            n_generated += 1
            try:
                self._on_token(chunk.seq, logits[row], context)
            except Exception as exc:  # noqa: BLE001 - detokenizer/stop/emit trouble ends only this sequence
                logger.exception("token handling failed for %s", chunk.seq)
                if chunk.seq.status != SeqStatus.FINISHED:
                    self._finish(chunk.seq, FinishReason.ERROR, error=f"internal error: {type(exc).__name__}")
        self.metrics.on_step(plan.num_tokens, n_prompt, n_generated)

    @staticmethod
    def _context(seq: Sequence) -> np.ndarray:
        """The token history the sampler reads (prompt + output so far), where its penalties need it."""
        return seq.context_array() if seq.params.uses_context else _NO_CONTEXT

    def _on_token(self, seq: Sequence, logits_row: np.ndarray, context: np.ndarray) -> None:
        try:
            token, info = sample_token(logits_row, seq.params, seq.rng, context)
        except Exception as exc:      # noqa: BLE001
            logger.exception("sampling failed for %s", seq)
            self._finish(seq, FinishReason.ERROR, error=f"sampling error: {type(exc).__name__}")
            return
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.on_first_token(now - seq.arrival)
        elif seq.last_token_at is not None:
            self.metrics.on_token_interval(now - seq.last_token_at)
        seq.last_token_at = now
        seq.token_ids.append(token)
        event = SeqEvent(seq.request_id, seq.index, token_ids=[token], logprobs=[info] if info else None)
        if token in seq.stop_ids:
            event.text = self._flush_text(seq)
            self._finish(seq, FinishReason.STOP, event=event, stop_type="eos")
            return
        event.text = seq.stopper.push(seq.detokenizer.push(token))
        if seq.stopper.matched is not None:
            self._finish(seq, FinishReason.STOP, event=event, stop_type="word", stopping_word=seq.stopper.matched)
        elif seq.max_tokens is not None and seq.num_output_tokens >= seq.max_tokens:
            event.text += self._flush_text(seq)
            self._finish(seq, FinishReason.LENGTH, event=event, stop_type="limit")
        elif seq.num_tokens >= self.max_model_len:
            event.text += self._flush_text(seq)
            self._finish(seq, FinishReason.LENGTH, event=event, stop_type="limit")
        else:
            self._emit(seq, event)

    @staticmethod
    def _flush_text(seq: Sequence) -> str:
        return seq.stopper.push(seq.detokenizer.flush()) + seq.stopper.flush()

    def _finish(self, seq: Sequence, reason: FinishReason, *, event: SeqEvent | None = None, notify: bool = True,
                stop_type: str | None = None, stopping_word: str = "", error: str | None = None) -> None:
        slot = seq.slot
        self.scheduler.remove(seq)
        seq.slot = slot                       # reported in the final event
        seq.finish_reason = reason
        seq.finished_at = now = time.perf_counter()
        with self._lock:
            self._in_system -= 1
        seqs = self._requests.get(seq.request_id)
        if seqs is not None and all(s.status == SeqStatus.FINISHED for s in seqs):
            del self._requests[seq.request_id]
        self.metrics.on_finish(reason.value, now - seq.arrival, seq.num_prompt_tokens, seq.num_output_tokens)
        if not notify:
            return
        event = event or SeqEvent(seq.request_id, seq.index)
        event.finish_reason = reason.value
        event.stop_type = stop_type or ("eos" if reason == FinishReason.STOP else "none")
        event.stopping_word = stopping_word
        event.error = error
        event.prompt_tokens = seq.num_prompt_tokens
        event.completion_tokens = seq.num_output_tokens
        event.cached_tokens = seq.num_cached_tokens
        start = seq.first_scheduled or seq.arrival
        first = seq.first_token_at or now
        event.prompt_seconds = max(0.0, first - start)
        event.decode_seconds = max(0.0, now - first)
        self._emit(seq, event)

    def _emit(self, seq: Sequence, event: SeqEvent) -> None:
        event.slot = seq.slot
        try:
            seq.emit(event)
        except Exception:             # noqa: BLE001 - a dead handler must not stop the engine
            logger.debug("emit failed for %s", seq.request_id, exc_info=True)

    def _abort_all(self, message: str) -> None:
        for seqs in list(self._requests.values()):
            for seq in seqs:
                if seq.status != SeqStatus.FINISHED:
                    self._finish(seq, FinishReason.ERROR, error=message)
        with self._lock:
            pending, self._inbox = list(self._inbox), deque()
        for seqs in pending:
            for seq in seqs:
                seq.status = SeqStatus.FINISHED
                with self._lock:
                    self._in_system -= 1
                self._emit(seq, SeqEvent(seq.request_id, seq.index, finish_reason="error", error=message))

    def _publish_stats(self) -> None:
        sched, blocks = self.scheduler, self.blocks
        slots = [{"id": s.slot, "request_id": s.request_id, "index": s.index, "n_prompt_tokens": s.num_prompt_tokens,
                  "n_decoded": s.num_output_tokens, "n_computed": s.num_computed} for s in sched.running]
        stats = {"running": len(sched.running), "waiting": len(sched.waiting), "kv_used_blocks": blocks.num_used,
                 "kv_total_blocks": blocks.n_blocks, "kv_usage": blocks.usage(), "slots": slots,
                 "preemptions": sched.num_preemptions, "prefix_cache_queries": blocks.prefix_queries,
                 "prefix_cache_hits": blocks.prefix_hits}
        with self._lock:
            self._stats = stats
        self.metrics.on_state(stats["running"], stats["waiting"], stats["kv_usage"], blocks.n_blocks,
                              blocks.prefix_queries, blocks.prefix_hits, sched.num_preemptions)

