"""A stand-in for bitnet_py.model.Model with the same interface, for engine and server tests.

Logits of a token are a deterministic function of the whole token history of its sequence *as read back from
the KV cache through the block table* (each token stores its id in K), so wrong block tables, wrong positions,
a prefix-cache mix-up or cross-talk between sequences of a batch change the output.
Tokenizer: ids 0..2 = <unk> <s> </s>, 3..258 = bytes 0..255, then a few multi-byte "word" tokens.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

WORDS = [b" the", b" cat", b" sat", b" on", b" mat", b"ing", b"ed", b" and", b"\n\n", b"STOP", b" \xf0\x9f\x99\x82",
         b"\xe6\x97\xa5", b"\xe6", b"\x97\xa5"]
N_SPECIAL = 3
N_VOCAB = N_SPECIAL + 256 + len(WORDS)
N_TABLE = 1021


@dataclass(frozen=True)
class FakeConfig:
    n_vocab: int = N_VOCAB
    n_layer: int = 1
    n_ctx_train: int = 512
    n_head: int = 1
    n_kv_head: int = 1
    head_dim: int = 2
    arch: str = "fake"


class FakeKV:
    def __init__(self, n_blocks: int, block_size: int) -> None:
        shape = (1, n_blocks * block_size, 1, 2)
        self.k = np.full(shape, -1.0, dtype=np.float16)   # [n_layer, slots, n_kv_head, head_dim]
        self.v = np.zeros(shape, dtype=np.float16)
        self.block_size = block_size


class FakeTokenizer:
    bos_id = 1
    eos_id = 2
    eot_id = None
    vocab_size = N_VOCAB

    def __init__(self) -> None:
        self.stop_ids = frozenset({self.eos_id})
        self._pieces = [b"<unk>", b"<s>", b"</s>"] + [bytes([i]) for i in range(256)] + WORDS
        self._by_len = sorted(range(N_SPECIAL + 256, N_VOCAB), key=lambda i: -len(self._pieces[i]))

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        ids = [self.bos_id] if add_bos in (None, True) else []
        if parse_special:
            for name, tid in ((b"<s>", 1), (b"</s>", 2)):
                data = data.replace(name, b"\x00\x00" + bytes([tid]))
        i = 0
        while i < len(data):
            if parse_special and data[i:i + 2] == b"\x00\x00" and i + 2 < len(data):
                ids.append(data[i + 2])
                i += 3
                continue
            for tid in self._by_len:
                piece = self._pieces[tid]
                if data.startswith(piece, i) and len(piece) > 1:
                    ids.append(tid)
                    i += len(piece)
                    break
            else:
                ids.append(N_SPECIAL + data[i])
                i += 1
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < N_SPECIAL:
            return b""
        return self._pieces[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id < N_SPECIAL

    def decode(self, ids, skip_special: bool = False) -> str:
        out = b""
        for i in ids:
            out += self.token_bytes(i) if (i >= N_SPECIAL or skip_special) else self._pieces[i]
        return out.decode("utf-8", errors="replace")


class FakeChatTemplate:
    def render(self, messages, add_generation_prompt: bool = True) -> str:
        parts = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError("bad message")
            parts.append(f"{m['role']}: {m.get('content') or ''}\n")
        if add_generation_prompt:
            parts.append("assistant:")
        return "".join(parts)

    def encode(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return FakeTokenizer().encode(self.render(messages, add_generation_prompt), parse_special=True)


class FakeModel:
    """delay_s: sleep per forward plus per_token_s per token; `gate`: every forward waits until it is set (it starts
    set; a test clears it to hold the engine mid-step, so requests it sends meanwhile meet a busy engine whatever
    the host's speed)."""

    def __init__(self, delay_s: float = 0.0, per_token_s: float = 0.0, seed: int = 7, eos_boost: float = 0.0):
        self.config = FakeConfig()
        self.tokenizer = FakeTokenizer()
        self.chat_template = FakeChatTemplate()
        self.delay_s = delay_s
        self.per_token_s = per_token_s
        rng = np.random.default_rng(seed)
        self.table = (rng.standard_normal((N_TABLE, N_VOCAB)) * 4.0).astype(np.float32)   # [N_TABLE, V]
        self.table[:, 2] += eos_boost
        readable = [N_SPECIAL + c for c in b"abcdefghijklmnopqrstuvwxyz .,"] + list(range(N_SPECIAL + 256, N_VOCAB))
        self.table[:, readable] += 4.0             # mostly readable text
        self.table[:, :N_SPECIAL - 1] -= 50.0     # never emit <unk> or <s>
        self.gate = threading.Event()
        self.gate.set()
        self.forward_calls = 0
        self.batch_sizes: list[int] = []           # number of sequences per forward
        self.token_counts: list[int] = []

    @classmethod
    def load(cls, path=None, tl2_config=None):
        return cls()

    def new_kv_cache(self, n_blocks: int, block_size: int) -> FakeKV:
        return FakeKV(n_blocks, block_size)

    def forward(self, batch, kv: FakeKV, heads=None) -> np.ndarray:
        self.head_requests = heads  # what the engine asked of the head (a real model may screen)
        if not self.gate.wait(60):
            raise RuntimeError("FakeModel.gate was never set again")
        tokens = np.asarray(batch.tokens)
        positions = np.asarray(batch.positions)
        seq_index = np.asarray(batch.seq_index)
        tables = np.asarray(batch.block_tables)
        bs = kv.block_size
        self.forward_calls += 1
        self.batch_sizes.append(int(tables.shape[0]))
        self.token_counts.append(int(tokens.shape[0]))
        if self.delay_s or self.per_token_s:
            time.sleep(self.delay_s + self.per_token_s * tokens.shape[0])
        for t in range(tokens.shape[0]):          # write K/V of every token first
            pos = int(positions[t])
            block = int(tables[seq_index[t], pos // bs])
            assert block >= 0, "write through an unused block-table entry"
            kv.k[0, block * bs + pos % bs, 0, 0] = tokens[t]
            kv.k[0, block * bs + pos % bs, 0, 1] = pos
        out = np.empty((len(batch.logit_rows), N_VOCAB), dtype=np.float32)
        for r, t in enumerate(np.asarray(batch.logit_rows)):
            pos = int(positions[t])
            row = tables[seq_index[t]]
            h = 0
            for p in range(pos + 1):
                slot = int(row[p // bs]) * bs + p % bs
                stored_tok, stored_pos = kv.k[0, slot, 0, 0], kv.k[0, slot, 0, 1]
                assert stored_pos == p, f"slot {slot} holds position {stored_pos}, expected {p}"
                h = (h * 131 + int(stored_tok) + 1) % 1_000_000_007
            out[r] = self.table[h % N_TABLE]
        return out
