"""ModelConfig: hyperparameters from GGUF metadata, and per-architecture traits expressed as data."""
from __future__ import annotations

from dataclasses import dataclass

from .gguf.constants import Keys
from .gguf.reader import GGUFError, GGUFFile


@dataclass(frozen=True)
class ArchTraits:
    sub_norms: bool  # attn_sub_norm before attn_output, ffn_sub_norm before ffn_down
    ffn_act: str  # "silu" | "relu2": gate activation in act(gate) * up
    rope_neox: bool  # NEOX (i, i+d/2) pairs, else NORM (2i, 2i+1)
    default_rope_base: float


ARCHITECTURES: dict[str, ArchTraits] = {
    # microsoft/BitNet-b1.58-2B-4T
    "bitnet-b1.58": ArchTraits(sub_norms=True, ffn_act="relu2", rope_neox=True, default_rope_base=500000.0),
    # 1bitLLM/bitnet_b1_58-large / -3B
    "bitnet": ArchTraits(sub_norms=True, ffn_act="silu", rope_neox=True, default_rope_base=10000.0),
    # Falcon3-*-1.58bit, Llama3-8B-1.58 (ternary weights in a llama graph)
    "llama": ArchTraits(sub_norms=False, ffn_act="silu", rope_neox=False, default_rope_base=10000.0),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dims: int
    rope_freq_scale: float
    traits: ArchTraits

    def __post_init__(self):
        for field in ("n_vocab", "n_embd", "n_layer", "n_head", "n_kv_head", "head_dim", "n_ff", "n_ctx_train"):
            v = getattr(self, field)
            if not isinstance(v, int) or v <= 0:
                raise GGUFError(f"invalid {field} = {v!r} in model metadata")
        if self.n_head % self.n_kv_head:
            raise GGUFError(f"head_count {self.n_head} is not a multiple of head_count_kv {self.n_kv_head}")
        if self.rope_dims > self.head_dim or self.rope_dims % 2:
            raise GGUFError(f"rope dimension count {self.rope_dims} does not fit head dim {self.head_dim}")
        if self.n_embd > 1 << 16 or self.n_layer > 1024 or self.n_vocab > 1 << 22:
            raise GGUFError("absurd model dimensions in metadata")

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelConfig":
        arch = f.architecture
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{f.path}: unsupported architecture {arch!r} "
                            f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        traits = ARCHITECTURES[arch]

        def need(key: str):
            v = f.get(key)
            if v is None:
                raise GGUFError(f"{f.path}: missing metadata {key.format(arch=arch)}")
            return v

        n_embd = int(need(Keys.EMBEDDING_LENGTH))
        n_head = int(need(Keys.HEAD_COUNT))
        n_kv = f.get(Keys.HEAD_COUNT_KV, n_head)
        n_kv = int(n_kv if not hasattr(n_kv, "__len__") else n_kv[0])
        if n_head <= 0 or n_embd % n_head:
            raise GGUFError(f"{f.path}: embedding length {n_embd} not divisible by head count {n_head}")
        head_dim = int(f.get(Keys.KEY_LENGTH, n_embd // n_head))
        tokens = f.get(Keys.TOKENS)
        n_vocab = int(f.get(Keys.VOCAB_SIZE, len(tokens) if tokens is not None else 0))
        if "token_embd.weight" in f.tensors:
            n_vocab = f.tensors["token_embd.weight"].shape[1]
        scaling = f.get(Keys.ROPE_SCALING_TYPE, "none")
        factor = float(f.get(Keys.ROPE_SCALING_FACTOR, 1.0) or 1.0)
        if scaling not in ("none", "linear") and factor != 1.0:
            raise GGUFError(f"{f.path}: rope scaling {scaling!r} is not supported")
        return cls(
            arch=arch,
            name=str(f.get(Keys.NAME, "model")),
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=int(need(Keys.BLOCK_COUNT)),
            n_head=n_head,
            n_kv_head=n_kv,
            head_dim=head_dim,
            n_ff=int(need(Keys.FEED_FORWARD_LENGTH)),
            n_ctx_train=int(f.get(Keys.CONTEXT_LENGTH, 2048)),
            rms_eps=float(f.get(Keys.RMS_EPS, 1e-5)),
            rope_base=float(f.get(Keys.ROPE_FREQ_BASE, traits.default_rope_base)),
            rope_dims=int(f.get(Keys.ROPE_DIMENSION_COUNT, head_dim)),
            rope_freq_scale=1.0 / factor if scaling == "linear" else 1.0,
            traits=traits,
        )
