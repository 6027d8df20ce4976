"""Documents (from prepare_data.py) -> token ids, and the packed token stream the trainer samples windows from.

Plain document:  [BOS] text [EOS]
Chat document:   ids of the rendered prompt "User: <request><|eot_id|>Assistant: " (with BOS, exactly what the
                 chat template + tokenizer give at inference time) + ids of the answer encoded on its own
                 + [<|eot_id|>]. Encoding the answer separately reproduces the token boundary a served chat
                 sees: the prompt ends in a lone " " token and the answer starts without a leading space.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from train_tokenizer import BOS, EOS, EOT


def chat_prompt(user: str) -> str:
    """The 2B-4T chat template rendered for one user message with add_generation_prompt."""
    return f"User: {user.strip()}{EOT}Assistant: "


class DocEncoder:
    def __init__(self, tokenizer_dir: Path):
        self.tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        self.bos, self.eos, self.eot = (self.tok.token_to_id(s) for s in (BOS, EOS, EOT))

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids as a server tokenizes them: BOS + text, special tokens matched."""
        return self.tok.encode(text).ids

    def encode_doc(self, doc: dict) -> list[int]:
        if doc["kind"] == "text":
            return self.tok.encode(doc["text"]).ids + [self.eos]
        prompt = self.tok.encode(chat_prompt(doc["user"])).ids
        answer = self.tok.encode(doc["assistant"].strip(), add_special_tokens=False).ids
        return prompt + answer + [self.eot]


def load_docs(data_dir: Path, split: str) -> list[dict]:
    return json.loads((data_dir / f"{split}.json").read_text())


def token_stream(enc: DocEncoder, docs: list[dict]) -> np.ndarray:
    """All documents concatenated in their stored (already shuffled) order: int64[N]."""
    ids: list[int] = []
    for d in docs:
        ids.extend(enc.encode_doc(d))
    return np.asarray(ids, dtype=np.int64)


def eval_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens covering the stream: int64[W, seq_len + 1]."""
    n = (len(stream) - 1) // seq_len
    return np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
