"""Decides, before every engine step, which tokens of which sequences go into the one batched forward.

Policy (continuous batching with chunked prefill):
1. every running sequence with one token left to feed (decoding) gets that token: all streams advance every step;
2. prompts still being prefilled get chunks of `min(prefill_chunk, remaining)` tokens while the step's prefill
   budget (`prefill_chunk` tokens) lasts. A sequence's chunk boundaries depend only on its own prompt, never on
   the other sequences, so its numbers are the same alone or in a batch;
3. waiting sequences are admitted (FIFO) while there is a free slot (`max_num_seqs`) and KV blocks for their
   whole prompt; they may start prefilling in the same step.
When a decoding sequence needs a new KV block and none is free, the youngest running sequence is preempted:
its blocks are released (full blocks stay in the prefix cache) and it goes back to the head of the queue to be
recomputed later. Used only from the engine thread.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from bitnet_py.block_manager import BlockManager
from bitnet_py.sequence import Sequence, SeqStatus

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
    seq: Sequence
    start: int      # index in seq.token_ids of the first token fed
    length: int     # number of tokens fed
    sample: bool    # the chunk reaches the end of token_ids: its last row's logits pick the next token


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    out_of_memory: list[Sequence] = field(default_factory=list)   # cannot grow even alone: finish as "length"

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, prefill_chunk: int) -> None:
        if max_num_seqs <= 0 or prefill_chunk <= 0:
            raise ValueError("max_num_seqs and prefill_chunk must be positive")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # admission order, oldest first
        self._free_slots = list(range(max_num_seqs))
        self.num_preemptions = 0

    # ---- membership -------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and return its KV blocks and slot."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status == SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.blocks.free_seq(seq)
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            self._free_slots.sort()
            seq.slot = -1

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s", seq)
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- planning ---------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        scheduled: set[int] = set()
        self._schedule_decodes(plan, scheduled)
        budget = self.prefill_chunk
        for seq in self.running:
            if seq.seq_id in scheduled:
                continue
            budget = self._try_prefill(plan, seq, budget)
            scheduled.add(seq.seq_id)
        self._admit(plan, budget)
        return plan

    def _schedule_decodes(self, plan: StepPlan, scheduled: set[int]) -> None:
        for seq in list(self.running):
            if seq.status != SeqStatus.RUNNING or seq.num_uncomputed != 1:
                continue          # prefilling, or preempted as a victim earlier in this loop
            ok = True
            while not self.blocks.ensure_slots(seq, seq.num_tokens):
                victim = self.running[-1]      # youngest; never one already scheduled (those are older)
                if victim is seq:
                    if len(self.running) == 1:
                        plan.out_of_memory.append(seq)
                    else:
                        self._preempt(seq)
                    ok = False
                    break
                self._preempt(victim)
            if ok:
                plan.chunks.append(Chunk(seq, seq.num_computed, 1, True))
                scheduled.add(seq.seq_id)

    def _try_prefill(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        remaining = seq.num_uncomputed
        if remaining <= 0:
            return budget
        length = min(self.prefill_chunk, remaining)
        if length > budget:
            return budget
        plan.chunks.append(Chunk(seq, seq.num_computed, length, length == remaining))
        return budget - length

    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs and self._free_slots:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq, reserve=len(self.running)):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SeqStatus.RUNNING
            seq.slot = self._free_slots.pop(0)
            self.running.append(seq)
            budget = self._try_prefill(plan, seq, budget)


def _batch_class():
    try:
        from bitnet_py.model import Batch
    except ModuleNotFoundError as exc:      # model module not written yet: same fields, plain container
        if exc.name != "bitnet_py.model":
            raise
        from types import SimpleNamespace as Batch
    return Batch


def make_batch(tokens, positions, seq_index, block_tables, logit_rows):
    """Batch from python lists; block_tables is a ragged list of block-id lists (padded with -1)."""
    width = max(1, max((len(t) for t in block_tables), default=1))
    tables = np.full((len(block_tables), width), -1, dtype=np.int32)      # int32[S, B]
    for i, t in enumerate(block_tables):
        tables[i, :len(t)] = t
    return _batch_class()(tokens=np.asarray(tokens, dtype=np.int32), positions=np.asarray(positions, dtype=np.int32),
                          seq_index=np.asarray(seq_index, dtype=np.int32), block_tables=tables,
                          logit_rows=np.asarray(logit_rows, dtype=np.int32))


def build_batch(plan: StepPlan, block_size: int):
    """The step's Batch (sequences concatenated in plan order) and, in order, the logits row of each sampling
    chunk (row r of the forward's output belongs to the r-th chunk with `sample` set)."""
    tokens: list[int] = []
    positions: list[int] = []
    seq_index: list[int] = []
    tables: list[list[int]] = []
    logit_rows: list[int] = []
    for s, chunk in enumerate(plan.chunks):
        seq = chunk.seq
        end = chunk.start + chunk.length
        assert len(seq.block_table) * block_size >= end, "block table does not cover the chunk"
        tokens.extend(seq.token_ids[chunk.start:end])
        positions.extend(range(chunk.start, end))
        seq_index.extend([s] * chunk.length)
        tables.append(seq.block_table)
        if chunk.sample:
            logit_rows.append(len(tokens) - 1)
    batch = make_batch(tokens, positions, seq_index, tables, logit_rows)
    return batch, list(range(len(logit_rows)))
