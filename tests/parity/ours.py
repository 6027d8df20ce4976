"""Our side of each comparison, straight on bitnet_py's Model (no server in between)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bitnet_py.generate import Sequence1, generate
from bitnet_py.gguf.constants import GGMLType
from bitnet_py.model import Batch, Model

from .compare import margins

TERNARY_TYPES = {GGMLType.I2_S, GGMLType.TL2, GGMLType.TQ1_0, GGMLType.TQ2_0}


def is_ternary(model: Model) -> bool:
    """True when the file's linear weights are ternary (int8 activation quantization in every linear)."""
    return any(t.type_id in TERNARY_TYPES for t in model.gguf.tensors.values())


@dataclass
class OurRun:
    ids: list[int]
    step_logits: list[np.ndarray]  # f32[V] before each generated token
    step_margins: np.ndarray  # f32[n]
    prompt_ms: float = 0.0
    gen_ms: float = 0.0
    pieces: list[bytes] = field(default_factory=list)

    def rates(self, n_prompt: int) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s); decode counts the forwards after the first token."""
        prefill = n_prompt / self.prompt_ms * 1000 if self.prompt_ms else 0.0
        decode = (len(self.ids) - 1) / self.gen_ms * 1000 if self.gen_ms and len(self.ids) > 1 else 0.0
        return prefill, decode


def greedy_run(model: Model, prompt_ids: list[int], n_predict: int, ubatch: int = 512,
               stop_ids: frozenset[int] = frozenset()) -> OurRun:
    res = generate(model, prompt_ids, n_predict, ubatch=ubatch, keep_logits=True, stop_ids=stop_ids)
    tok = model.tokenizer
    return OurRun(res.ids, res.step_logits, margins(np.stack(res.step_logits)), res.prompt_ms, res.gen_ms,
                  [tok.token_bytes(t) for t in res.ids])


def teacher_forced(model: Model, prompt_ids: list[int], next_id, n_steps: int, ubatch: int = 512) -> OurRun:
    """Our logits along the peer's continuation: `next_id(step, logits) -> id` says which token the peer took at
    each step (the logits let a caller resolve a token the peer named only by its text)."""
    seq = Sequence1(model, len(prompt_ids) + n_steps)
    logits = seq.feed(list(prompt_ids), ubatch)
    ids, steps = [], []
    for i in range(n_steps):
        steps.append(logits.copy())
        tok = int(next_id(i, logits))
        ids.append(tok)
        if i + 1 < n_steps:
            logits = seq.feed([tok])
    return OurRun(ids, steps, margins(np.stack(steps)) if steps else np.zeros(0, np.float32))


def all_position_logits(model: Model, ids: list[int], ubatch: int = 512) -> np.ndarray:
    """Logits after every token of `ids` (prompt fed in micro-batches of `ubatch`): f32[T, V]."""
    kv = model.new_kv_cache(1, len(ids))
    tables = np.zeros((1, 1), dtype=np.int32)
    out = []
    for start in range(0, len(ids), ubatch):
        chunk = np.asarray(ids[start:start + ubatch], dtype=np.int32)
        n = len(chunk)
        batch = Batch(tokens=chunk, positions=np.arange(start, start + n, dtype=np.int32),
                      seq_index=np.zeros(n, dtype=np.int32), block_tables=tables,
                      logit_rows=np.arange(n, dtype=np.int32))
        out.append(model.forward(batch, kv))
    return np.concatenate(out)
