"""Incremental detokenizer: token ids in, text out, never half a UTF-8 character.

Token pieces are raw bytes (byte-level BPE and `<0xXX>` tokens can split a character across tokens). Bytes
are held back while they may still start a valid character; a sequence that can no longer become valid is
replaced by U+FFFD as soon as that is known. The concatenated output of push() calls plus flush() equals
`b"".join(pieces).decode("utf-8", errors="replace")`.
"""
from __future__ import annotations

import codecs
import logging

log = logging.getLogger(__name__)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = bool(skip_special)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token; returns the text completed by it (possibly empty)."""
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def push_many(self, token_ids) -> str:
        return "".join(self.push(t) for t in token_ids)

    @property
    def pending_bytes(self) -> bytes:
        """Bytes held back because they may be the start of a character."""
        return self._decoder.getstate()[0]

    def flush(self) -> str:
        """End of stream: whatever is held back (an incomplete character becomes U+FFFD); resets."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out
