"""BitNet b1.58 (2B-4T layout) decoder in PyTorch, for quantization-aware training and as the reference forward.

Semantics follow transformers' `BitNetForCausalLM` with `AutoBitLinear` in online mode (see the fixture README,
section tiny-bitnet-b158):
  WeightQuant (per tensor, float32): s_w = 1 / max(mean|W|, 1e-5);  W_eff = clamp(round(W*s_w), -1, 1) / s_w
  ActQuant (per token, last dim):    s_x = 127 / max(max|x|, 1e-5); x_eff = clamp(round(x*s_x), -128, 127) / s_x
  y = x_eff @ W_eff^T (no bias)
In training both quantizers use the straight-through estimator (forward = quantized, gradient = identity); in
eval mode (`model.eval()`) the quantized values are used directly, with no STE arithmetic, so the eval forward
is the exact HF formula. Embeddings, the tied output head and RMSNorm gains are never quantized.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BitNetConfig:
    vocab_size: int = 4096
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 2048
    bos_token_id: int = 4093
    eos_token_ids: tuple = (4094, 4095)
    dropout: float = 0.0  # residual-branch dropout, training only (not part of the exported model)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Ternary absmean quantization, de-quantized: values in {-1, 0, +1} / s_w (in w's dtype, float32 here)."""
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1) / s


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 absmax quantization of the last dim, de-quantized (float32)."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


class BitLinear(nn.Linear):
    """nn.Linear whose forward uses ternary weights and int8 activations (STE while training)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            w = self.weight
            wq = w + (weight_quant(w) - w).detach()
            xq = x + (act_quant(x) - x).detach()
        else:
            wq = weight_quant(self.weight)
            xq = act_quant(x)
        return F.linear(xq, wq)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(cfg: BitNetConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for NEOX rotate_half, theta_i = base^(-2i/d)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [d/2]
    ang = positions.double()[:, None] * inv.double()[None, :]  # [T, d/2]
    emb = torch.cat([ang, ang], dim=-1)  # [T, d]
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = BitLinear(cfg.hidden_size, cfg.num_attention_heads * hd)
        self.k_proj = BitLinear(cfg.hidden_size, cfg.num_key_value_heads * hd)
        self.v_proj = BitLinear(cfg.hidden_size, cfg.num_key_value_heads * hd)
        self.o_proj = BitLinear(cfg.num_attention_heads * hd, cfg.hidden_size)
        self.attn_sub_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = h.shape
        hd = cfg.head_dim
        q = self.q_proj(h).view(b, t, cfg.num_attention_heads, hd).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(h).view(b, t, cfg.num_key_value_heads, hd).transpose(1, 2)  # [B, KV, T, d]
        v = self.v_proj(h).view(b, t, cfg.num_key_value_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        k = k.repeat_interleave(rep, dim=1)  # query head j uses kv head j // rep
        v = v.repeat_interleave(rep, dim=1)
        if self.training:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # eager math, as transformers' eager attention
            scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # [B, H, T, T]
            mask = torch.ones(t, t, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
            a = torch.softmax(scores, dim=-1) @ v
        a = a.transpose(1, 2).reshape(b, t, cfg.num_attention_heads * hd)
        return self.o_proj(self.attn_sub_norm(a))


class MLP(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.gate_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = BitLinear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.gate_proj(h)).square() * self.up_proj(h)
        return self.down_proj(self.ffn_sub_norm(f))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.p_drop = cfg.dropout

    def forward(self, x, cos, sin):
        a = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + F.dropout(a, self.p_drop, self.training)
        f = self.mlp(self.post_attention_layernorm(x))
        return x + F.dropout(f, self.p_drop, self.training)


class BitNetLM(nn.Module):
    """Parameter names equal HF's `model.*` names with the `model.` prefix dropped."""

    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def init_weights(self, generator: torch.Generator) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.num_hidden_layers), generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] int64 -> logits [B, T, V] float32 (positions 0..T-1)."""
        cos, sin = rope_tables(self.cfg, torch.arange(ids.shape[1]))
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.linear(self.norm(x), self.embed_tokens.weight)
