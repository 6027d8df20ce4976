"""SentencePiece-style BPE (GGUF `tokenizer.ggml.model` = "llama") as llama.cpp runs it.

The text (spaces already turned into U+2581 by the caller) starts as one symbol per character. Every pair
of neighbours whose concatenation is a vocabulary entry is a candidate; the candidate whose entry has the
highest score is merged first (ties: the leftmost). Merging creates new candidates with the new neighbours;
stale candidates (a side already merged away or grown) are skipped. A final symbol that is not a vocabulary
entry (only single characters can be) falls back to its UTF-8 bytes as `<0xXX>` tokens.
"""
from __future__ import annotations

import heapq
import logging

log = logging.getLogger(__name__)

SPM_SPACE = "\u2581"  # "▁"


def byte_token_text(b: int) -> str:
    return f"<0x{b:02X}>"


class SPMEncoder:
    def __init__(self, tokens: list[str], scores, unk_id: int | None):
        self.token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            self.token_to_id[t] = i
        n = len(tokens)
        self.scores: list[float] = [float(s) for s in scores] if scores is not None else [0.0] * n
        if len(self.scores) != n:
            raise ValueError(f"tokenizer.ggml.scores has {len(self.scores)} entries for {n} tokens")
        self.unk_id = unk_id
        self._byte_ids: list[int | None] = [self._byte_fallback_id(b) for b in range(256)]

    def _byte_fallback_id(self, b: int) -> int | None:
        tid = self.token_to_id.get(byte_token_text(b))
        if tid is None and b < 0x80:
            tid = self.token_to_id.get(chr(b))
        if tid is None:
            tid = self.unk_id
        return tid

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, which must already have its spaces escaped (and any prefix added)."""
        n = len(text)
        if n == 0:
            return []
        vocab = self.token_to_id
        scores = self.scores
        start = list(range(n))  # symbol i covers text[start[i]:start[i]+length[i]]
        length = [1] * n  # 0 = merged into its left neighbour
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1

        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, combined length)
        for i in range(n - 1):
            tid = vocab.get(text[i:i + 2])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        push = heapq.heappush
        pop = heapq.heappop

        while heap:
            _, left, right, size = pop(heap)
            len_l = length[left]
            len_r = length[right]
            if len_l == 0 or len_r == 0 or len_l + len_r != size:
                continue
            length[left] = size
            length[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            before = prev[left]
            if before >= 0:
                s = start[before]
                combined = length[before] + size
                tid = vocab.get(text[s:s + combined])
                if tid is not None:
                    push(heap, (-scores[tid], before, left, combined))
            if after >= 0:
                s = start[left]
                combined = size + length[after]
                tid = vocab.get(text[s:s + combined])
                if tid is not None:
                    push(heap, (-scores[tid], left, after, combined))

        out: list[int] = []
        i = 0
        while i != -1:
            piece = text[start[i]:start[i] + length[i]]
            tid = vocab.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                for b in piece.encode("utf-8"):
                    bid = self._byte_ids[b]
                    if bid is not None:
                        out.append(bid)
            i = nxt[i]
        return out
