"""Paged KV block allocation with a prompt-prefix cache.

The KV cache is split into `n_blocks` blocks of `block_size` token slots. A sequence owns a list of block ids
(its block table). A block whose `block_size` tokens are all computed gets a chain hash
(hash of the previous block's hash and its own token ids) and is entered in the prefix cache; a later sequence
whose prompt starts with the same tokens reuses it (reference counted) instead of recomputing it.
Blocks with no references stay cached in an LRU free list and are evicted (oldest first) when fresh blocks are
needed. Used only from the engine thread.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

from bitnet_py.sequence import Sequence

logger = logging.getLogger(__name__)


def chain_key(parent: int | None, tokens: list[int]) -> tuple:
    """Prefix-cache key of a full block: the previous block's hash and this block's token ids (compared exactly
    on lookup, so a hash collision cannot hand out the wrong KV)."""
    return (parent, tuple(tokens))


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        if n_blocks <= 0 or block_size <= 0:
            raise ValueError("n_blocks and block_size must be positive")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref_count = [0] * n_blocks
        self.block_key: list[tuple | None] = [None] * n_blocks
        self.cached: dict[tuple, int] = {}                  # chain key -> block id
        # blocks with ref_count 0, least recently freed first (value unused)
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(n_blocks))
        self.prefix_queries = 0     # prompt tokens looked up in the cache
        self.prefix_hits = 0        # of which found

    # ---- accounting -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.n_blocks - len(self.free)

    def usage(self) -> float:
        return self.num_used / self.n_blocks

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_key[block]
        if old is not None:                     # evict its cache entry
            if self.cached.get(old) == block:
                del self.cached[old]
            self.block_key[block] = None
        self.ref_count[block] = 1
        return block

    def _match_prefix(self, tokens: list[int]) -> list[tuple[int, int]]:
        """(hash, block id) of the cached leading full blocks of `tokens`."""
        if not self.enable_prefix_cache:
            return []
        matches = []
        parent = None
        bs = self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            key = chain_key(parent, tokens[start:start + bs])
            block = self.cached.get(key)
            if block is None:
                break
            parent = hash(key)
            matches.append((parent, block))
        return matches

    @staticmethod
    def _matchable(seq: Sequence) -> list[int]:
        if not seq.use_prefix_cache:
            return []
        return seq.token_ids[: max(0, seq.num_tokens - 2)]

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Blocks for all of seq's tokens are available, keeping `reserve` free blocks for running sequences."""
        need = self.blocks_for(seq.num_tokens)
        matches = self._match_prefix(self._matchable(seq))
        reusable_free = sum(1 for _, b in matches if self.ref_count[b] == 0)
        return need - len(matches) <= self.num_free - reusable_free - reserve

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        At least the last two tokens are always recomputed: the last one for its logits, and never as a lone
        token, because a one-token step uses decode-style rounding in attention, which would make a cached
        prompt's output differ from an uncached one.
        """
        assert not seq.block_table, "sequence already has blocks"
        matches = self._match_prefix(self._matchable(seq))
        if seq.num_preemptions == 0:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(matches) * self.block_size
        for h, block in matches:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_hashed_blocks = len(matches)
        seq.num_computed = len(matches) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed
        for _ in range(self.blocks_for(seq.num_tokens) - len(matches)):
            seq.block_table.append(self._take_free())

    def ensure_slots(self, seq: Sequence, n_tokens: int) -> bool:
        """Make sure the block table covers token positions < n_tokens; False if the pool is out of blocks."""
        need = self.blocks_for(n_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Enter the sequence's newly completed full blocks into the prefix cache."""
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        n_full = seq.num_computed // bs
        while seq.num_hashed_blocks < n_full:
            i = seq.num_hashed_blocks
            parent = seq.block_hashes[i - 1] if i > 0 else None
            key = chain_key(parent, seq.token_ids[i * bs:(i + 1) * bs])
            block = seq.block_table[i]
            if key not in self.cached and self.block_key[block] is None:
                self.cached[key] = block
                self.block_key[block] = key
            seq.block_hashes.append(hash(key))
            seq.num_hashed_blocks += 1

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks go to the free list first (evicted before the head)."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_key[block] is None:
                    self.free[block] = None
                    self.free.move_to_end(block, last=False)   # uncached blocks are reused first
                else:
                    self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed = 0
