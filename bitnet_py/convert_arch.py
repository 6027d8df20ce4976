"""Per-architecture facts for the converter: HF config -> GGUF hyper-parameters, HF tensor names -> GGUF names.

| HF `architectures`  | GGUF arch      | ternary weights in the checkpoint            | q/k rows         |
| ------------------- | -------------- | -------------------------------------------- | ---------------- |
| BitnetForCausalLM   | `bitnet`       | latent bf16, ternarized here (absmean)       | as is (NEOX)     |
| BitNetForCausalLM   | `bitnet-b1.58` | latent bf16 (absmean) or packed uint8+scale  | as is (NEOX)     |
| LlamaForCausalLM    | `llama`        | already {-a,0,a}, or packed uint8+scale      | permuted (NORM)  |
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from .gguf.constants import Keys


@dataclass(frozen=True)
class ArchSpec:
    hf_name: str
    gguf_arch: str
    absmean: bool  # latent float weights are ternarized with the absmean rule
    permute_qk: bool  # NORM rope: HF q/k rows are reordered
    rope_scaling_linear_1: bool  # bitnet.cpp writes a no-op linear rope scaling for `bitnet`
    rope_dims: bool  # writes rope.dimension_count


ARCHS = {
    "BitnetForCausalLM": ArchSpec("BitnetForCausalLM", "bitnet", True, False, True, False),
    "BitNetForCausalLM": ArchSpec("BitNetForCausalLM", "bitnet-b1.58", True, False, False, True),
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", "llama", False, True, False, True),
}

TERNARY_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.inner_attn_ln": "attn_sub_norm", "self_attn.attn_sub_norm": "attn_sub_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.ffn_layernorm": "ffn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",
}
_TOP_MAP = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|weight_scale)$")
_SKIP_RE = re.compile(r"(rotary_emb\.inv_freq|\.weight_scale)$")


def load_config(hf_dir: str) -> tuple[dict, ArchSpec]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHS:
            return config, ARCHS[a]
    raise ValueError(f"{path}: unsupported architecture {archs}; supported: {', '.join(ARCHS)}")


def gguf_name(hf_name: str) -> str | None:
    """GGUF tensor name for a HF weight, None for tensors that are not written on their own
    (rotary caches, weight_scale companions of packed weights). Raises on unknown names."""
    if _SKIP_RE.search(hf_name):
        return None
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_MAP and m.group(3) == "weight":
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.weight"
    if hf_name.endswith(".weight") and hf_name[:-7] in _TOP_MAP:
        return f"{_TOP_MAP[hf_name[:-7]]}.weight"
    raise ValueError(f"unexpected tensor {hf_name!r} in the checkpoint (no GGUF mapping)")


def kind_of(gguf: str) -> str:
    """'attn_q', 'token_embd', 'output_norm', ... of a GGUF tensor name."""
    parts = gguf.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


@dataclass(frozen=True)
class HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    n_vocab: int
    rope_theta: float
    rms_eps: float


def hparams(config: dict) -> HParams:
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        hp = HParams(
            n_layer=int(config["num_hidden_layers"]), n_embd=n_embd, n_ff=int(config["intermediate_size"]),
            n_head=n_head, n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or n_embd // n_head),
            n_ctx=int(config.get("max_position_embeddings", 2048)), n_vocab=int(config["vocab_size"]),
            rope_theta=float(config.get("rope_theta", 10000.0)), rms_eps=float(config.get("rms_norm_eps", 1e-6)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json lacks a usable hyper-parameter: {e}") from None
    return hp


def arch_metadata(spec: ArchSpec, hp: HParams, name: str, file_type: int) -> dict:
    """general.* and <arch>.* keys in bitnet.cpp's order (file_type and vocab_size after the eps)."""
    a = spec.gguf_arch

    def k(key: str) -> str:
        return key.format(arch=a)

    meta = {
        Keys.ARCHITECTURE: a, Keys.NAME: name,
        k(Keys.BLOCK_COUNT): hp.n_layer, k(Keys.CONTEXT_LENGTH): hp.n_ctx, k(Keys.EMBEDDING_LENGTH): hp.n_embd,
        k(Keys.FEED_FORWARD_LENGTH): hp.n_ff, k(Keys.HEAD_COUNT): hp.n_head, k(Keys.HEAD_COUNT_KV): hp.n_head_kv,
        k(Keys.ROPE_FREQ_BASE): np.float32(hp.rope_theta), k(Keys.RMS_EPS): np.float32(hp.rms_eps),
        Keys.FILE_TYPE: file_type, k(Keys.VOCAB_SIZE): hp.n_vocab,
    }
    if spec.rope_dims:
        meta[k(Keys.ROPE_DIMENSION_COUNT)] = hp.head_dim
    if hp.head_dim != hp.n_embd // hp.n_head:
        meta[k(Keys.KEY_LENGTH)] = hp.head_dim
        meta[k(Keys.VALUE_LENGTH)] = hp.head_dim
    if spec.rope_scaling_linear_1:
        meta[k(Keys.ROPE_SCALING_TYPE)] = "linear"
        meta[k(Keys.ROPE_SCALING_FACTOR)] = np.float32(1.0)
    return meta


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate_half) q/k rows -> NORM-rope order: rows of each head interleaved, (i, i+d/2) -> (2i, 2i+1)."""
    m, k = w.shape
    if m % (2 * n_head):
        raise ValueError(f"cannot permute a {m}-row q/k weight for {n_head} heads")
    return w.reshape(n_head, 2, m // n_head // 2, k).swapaxes(1, 2).reshape(m, k)


def unpack_hf_ternary(packed: np.ndarray, rows: int) -> np.ndarray:
    """transformers' packed BitNet weights: uint8 [ceil(M/4), K] holding 4 values per byte; bits 2i..2i+1 of
    packed row p are row i*P + p of the weight (P packed rows), stored as value + 1. -> int8 [rows, K]."""
    p, k = packed.shape
    out = np.empty((4, p, k), dtype=np.int8)
    for i in range(4):
        out[i] = ((packed >> (2 * i)) & 3).astype(np.int8) - 1
    w = out.reshape(4 * p, k)
    if rows > 4 * p:
        raise ValueError(f"packed weight with {p} rows cannot hold {rows} rows")
    return w[:rows]
