"""The transformer forward pass: a sequence of kernel calls over one ragged batch, nothing else.

Graph per layer (bitnet / bitnet-b1.58 / llama), as llama.cpp computes it:
  h = rms(x) * attn_norm; q, k, v = Wq h, Wk h, Wv h; rope(q, k); a = attention(q, k, v)
  [a = rms(a) * attn_sub_norm]; x += Wo a
  h = rms(x) * ffn_norm; f = act(Wgate h) * (Wup h); [f = rms(f) * ffn_sub_norm]; x += Wdown f
logits = head(rms(x) * output_norm).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np

from kernels.activations import relu2_mul, relu2_mul_parallel, silu_mul, silu_mul_parallel
from kernels.attention import paged_attention
from kernels.attention_split import choose_attention
from kernels.dense import f16_matmul, i8_matmul
from kernels.f16 import f16_lut, round_rows_f16
from kernels.kv_store import rope_store_f16
from kernels.norms import rms_norm, rms_norm_parallel
from kernels.quantize import quantize_rows_i8, quantize_rows_i8_parallel
from kernels.rope import rope_apply, rope_tables
from kernels.q8k import quantize_q8k, quantize_q8k_parallel, tq_matmul_q8k, tq_matmul_q8k_multi

from kernels import attention_fast, attention_split
from kernels import config as kernel_config
from kernels import layer_region, layer_steps
from kernels.select import weight_kernels

from .allocator import keep_freed_buffers
from .config import ModelConfig
from .gguf.constants import TQ_BLOCK, GGMLType
from .gguf.reader import GGUFFile
from .gguf.tl2_tiling import resolve_tiling
from .kv_cache import CACHE_DTYPES, KVCache
from .sampling import TopRequest
from .screened_head import can_screen, screened_logits, screening_possible
from .weights import (DenseWeight, ModelWeights, TernaryWeight, embedding_rows, head_tensor, int8_head,
                      load_weights, sparse_tensors)

log = logging.getLogger(__name__)

PARALLEL_ROWS = 4  # row-wise kernels (norms, quantization) go multi-threaded from this many tokens
# steps of at most this many tokens (decode) run each layer through kernels.layer_steps; longer ones keep the
# general path: their matmuls dwarf the Python overhead the layer steps remove, and a 128-token prefill measured
# 9 % slower through them on a 16-core Xeon (equal on 2 and 8 threads)
LAYER_STEPS_MAX_TOKENS = 16
HEAD_ACT_FLOOR = 1e-5  # int8 head: activation absmax floor (as I2_S)
HEAD_TYPES = ("f16", "int8")


def norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    (rms_norm_parallel if x.shape[0] >= PARALLEL_ROWS else rms_norm)(x, weight, eps, out)


@dataclass
class Batch:
    tokens: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]
    seq_index: np.ndarray  # i32[T]: row of block_tables
    block_tables: np.ndarray  # i32[S, B]
    logit_rows: np.ndarray  # i32[R]


@dataclass
class QuantizedActivation:
    q: np.ndarray  # i8[T, K]
    scales: np.ndarray  # f32[T]
    sums: np.ndarray  # i32[T]


def quantize_activation(x: np.ndarray, floor: float) -> QuantizedActivation:
    T, K = x.shape
    qa = QuantizedActivation(np.empty((T, K), np.int8), np.empty(T, np.float32), np.empty(T, np.int32))
    (quantize_rows_i8_parallel if T >= PARALLEL_ROWS else quantize_rows_i8)(x, floor, qa.q, qa.scales, qa.sums)
    return qa


@dataclass
class Q8KActivation:
    q: np.ndarray  # i8[T, K]
    d: np.ndarray  # f32[T, K/TQ_BLOCK]


def quantize_activation_q8k(x: np.ndarray) -> Q8KActivation:
    """TQ1_0 / TQ2_0 weights: upstream ggml's activation quantization, one scale per 256 inputs (Q8_K)."""
    T, K = x.shape
    qa = Q8KActivation(np.empty((T, K), np.int8), np.empty((T, K // TQ_BLOCK), np.float32))
    (quantize_q8k_parallel if T >= PARALLEL_ROWS else quantize_q8k)(np.ascontiguousarray(x, dtype=np.float32),
                                                                   qa.q, qa.d)
    return qa


def linear(w: TernaryWeight | DenseWeight, x: np.ndarray, qa: QuantizedActivation | Q8KActivation | None = None,
           round_f16: bool = True, n_threads: int = 0) -> np.ndarray:
    """x: f32[T, K] -> f32[T, M]. `qa` reuses a quantization of x (int8 per token with the same floor, or Q8_K
    for block-scaled weights). With f16 weights, x is rounded to f16 first (ggml) unless round_f16 is False
    (float32 frameworks). n_threads: numba's thread count, which sizes the ternary kernels' row tasks (0: fixed
    tasks)."""
    T = x.shape[0]
    out = np.empty((T, w.m), dtype=np.float32)
    if isinstance(w, TernaryWeight) and w.block_scales is not None:
        # TQ1_0 / TQ2_0: upstream ggml's arithmetic, activations quantized per 256 inputs (Q8_K)
        if not isinstance(qa, Q8KActivation):
            qa = quantize_activation_q8k(x)
        tq_matmul_q8k(w.packed, qa.q, qa.d, w.block_scales, out, n_threads)
    elif isinstance(w, TernaryWeight):
        if qa is None:
            qa = quantize_activation(x, w.act_floor)
        weight_kernels(w.layout, w.m, w.k).matmul(w.packed, qa.q, qa.scales, qa.sums, w.scale, out, n_threads)
    elif w.i8 is not None:
        qa = quantize_activation(np.ascontiguousarray(x), HEAD_ACT_FLOOR)
        i8_matmul(w.i8, w.i8_scales, qa.q, qa.scales, out)
    elif w.f16_bits is not None:
        x16 = np.array(x, dtype=np.float32, order="C")
        if round_f16:
            round_rows_f16(x16.reshape(-1), x16.reshape(-1))
        f16_matmul(w.f16_bits, x16, out, n_threads)
    else:
        np.matmul(x, w.f32.T, out=out)
    return out


_NO_WEIGHT = np.zeros(0, np.uint8)


def fusable(ws: list) -> bool:
    """Whether these weights (same input) can run as one fused ternary matmul: all per-tensor-scaled with one
    activation floor, or all block-scaled (TQ1_0 / TQ2_0)."""
    if not (kernel_config.FUSE and all(isinstance(w, TernaryWeight) for w in ws) and len({w.k for w in ws}) == 1):
        return False
    if all(w.block_scales is not None for w in ws):
        return True
    return (all(w.block_scales is None for w in ws) and len({w.act_floor for w in ws}) == 1
            and len({w.layout for w in ws}) == 1)


def fused_linear(ws: list, x: np.ndarray, n_threads: int = 0) -> list[np.ndarray]:
    """Two or three ternary weights on the same input x: f32[T, K]: one activation quantization, one parallel
    region -> [f32[T, M_i]]. Same results as separate `linear` calls (n_threads as there)."""
    T = x.shape[0]
    outs = [np.empty((T, w.m), dtype=np.float32) for w in ws]
    if ws[0].block_scales is not None:
        qk = quantize_activation_q8k(x)
        p2, s2, o2 = ((ws[2].packed, ws[2].block_scales, outs[2]) if len(ws) == 3 else
                      (_NO_WEIGHT, np.zeros((0, ws[0].k // TQ_BLOCK), np.float32), np.empty((T, 0), np.float32)))
        tq_matmul_q8k_multi(ws[0].packed, ws[1].packed, p2, qk.q, qk.d, ws[0].block_scales, ws[1].block_scales, s2,
                            outs[0], outs[1], o2, n_threads)
        return outs
    qa = quantize_activation(x, ws[0].act_floor)
    w2, o2 = (ws[2].packed, outs[2]) if len(ws) == 3 else (_NO_WEIGHT, np.empty((T, 0), np.float32))
    s2 = ws[2].scale if len(ws) == 3 else np.float32(0.0)
    weight_kernels(ws[0].layout, ws[0].m, ws[0].k).matmul_multi(ws[0].packed, ws[1].packed, w2, qa.q, qa.scales,
                                                                qa.sums, ws[0].scale, ws[1].scale, s2, outs[0],
                                                                outs[1], o2, n_threads)
    return outs


def shared_quantization(ws: list, x: np.ndarray) -> QuantizedActivation | Q8KActivation | None:
    """One quantization of x for several ternary weights that read the same input."""
    if all(isinstance(w, TernaryWeight) and w.block_scales is not None for w in ws):
        return quantize_activation_q8k(x)
    floors = {w.act_floor for w in ws if isinstance(w, TernaryWeight) and w.block_scales is None}
    return quantize_activation(x, floors.pop()) if len(floors) == 1 else None


class Model:
    def __init__(self, gguf: GGUFFile, config: ModelConfig, weights: ModelWeights, cache_type: str = "f16"):
        if cache_type not in CACHE_DTYPES:
            raise ValueError(f"cache type must be one of {sorted(CACHE_DTYPES)}, got {cache_type!r}")
        self.cache_type = cache_type  # "f16": ggml's f16 roundings (bitnet.cpp parity); "f32": none
        self.gguf = gguf
        self.config = config
        self.weights = weights
        c = config
        self._cos, self._sin = rope_tables(c.n_ctx_train if c.n_ctx_train < 1 << 17 else 1 << 17,
                                           c.rope_dims, c.rope_base, c.rope_freq_scale)
        self._lut = f16_lut()
        self._empty16 = np.zeros((c.n_kv_head, 0, c.head_dim), np.uint16)
        self._empty32 = np.zeros((c.n_kv_head, 0, c.head_dim), np.float32)
        relu2 = c.traits.ffn_act == "relu2"
        self._act = relu2_mul if relu2 else silu_mul
        self._act_parallel = relu2_mul_parallel if relu2 else silu_mul_parallel
        self._fuse_qkv = [fusable([L.wq, L.wk, L.wv]) for L in weights.layers]
        self._fuse_ffn = [fusable([L.w_gate, L.w_up]) for L in weights.layers]
        self._steps = self._plan_layer_steps()
        self._stack = self._plan_layer_stack()
        self._region = (layer_region.region_tables(self._steps)
                        if self._stack is not None and layer_region.HAVE_LAYER_REGION and kernel_config.LAYER_REGION
                        and c.n_head == 4 * c.n_kv_head else None)  # kernels.layer_region's weight tables
        # a screened f16 head stays in the file map when the weights are promoted; read whole, it follows them
        self._screened_head = head_tensor(gguf) if weights.screen is not None else None  # its tensor name

    def _plan_layer_steps(self) -> list[tuple[tuple, tuple]] | None:
        """Per layer, the weight arguments of kernels.layer_steps' two calls; None where a layer needs the general
        path (float weights, TQ block scales, mixed activation floors, a non-default ternary kernel)."""
        if not (layer_steps.HAVE_LAYER_STEPS and kernel_config.FUSE and kernel_config.LAYER_STEPS):
            return None
        c, none = self.config, np.zeros(0, np.float32)
        relu2 = c.traits.ffn_act == "relu2"
        steps = []
        for L in self.weights.layers:
            ws = [L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down]
            if not (all(isinstance(w, TernaryWeight) and w.block_scales is None
                        and weight_kernels(w.layout, w.m, w.k).name == layer_steps.TERNARY_KERNEL for w in ws)
                    and len({w.act_floor for w in ws}) == 1):
                return None
            floor = L.wq.act_floor
            pre = (L.attn_norm, c.rms_eps, L.wq.packed, L.wk.packed, L.wv.packed, L.wq.scale, L.wk.scale,
                   L.wv.scale, floor)
            post = (none if L.attn_sub_norm is None else L.attn_sub_norm, L.wo.packed, L.wo.scale, L.ffn_norm,
                    L.w_gate.packed, L.w_up.packed, L.w_down.packed, L.w_gate.scale, L.w_up.scale, L.w_down.scale,
                    none if L.ffn_sub_norm is None else L.ffn_sub_norm, floor, c.rms_eps, relu2)
            steps.append((pre, post))
        return steps

    def _plan_layer_stack(self) -> tuple[tuple, tuple] | None:
        """The layer steps' arguments as two tuples over layers (layer_steps.decode_layers: one call per step),
        where every layer's have the same types (numba indexes a tuple of one type at run time)."""
        if self._steps is None:
            return None
        pres, posts = tuple(p for p, _ in self._steps), tuple(p for _, p in self._steps)
        uniform = all(isinstance(numba.typeof(args), numba.types.UniTuple) for args in (pres, posts))
        return (pres, posts) if uniform else None

    @classmethod
    def load(cls, path: str, tl2_config: str | None = None, cache_type: str = "f16",
             head_type: str = "f16", no_mmap: bool = False, screen_head: bool = True,
             promote: bool = True) -> "Model":
        """head_type "int8": quantize an f16 output head to int8 per row at load (half the decode bytes of
        the head; logits no longer bit-comparable with bitnet.cpp). Default "f16" is exact.
        screen_head (f16 heads): also keep the head's int8 copy with error bounds, so that `forward` can return
        exact top-k logits from half the head's bytes (bitnet_py.screened_head); built once, then cached.
        no_mmap: copy the file into anonymous memory backed by huge pages (bitnet_py.huge_pages) before returning:
        a slower load (0.2-4 s per GB), the decode speed of a finished promotion; same results.
        promote (a mapped file): after loading, move the streamed weights into huge pages at the same addresses on
        a background thread (bitnet_py.promotion; `self.gguf.promotion`): the mapped load's speed, then
        --no-mmap's decode speed. False keeps reading the file's page-cache pages (shared between processes)."""
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head type must be one of {HEAD_TYPES}, got {head_type!r}")
        keep_freed_buffers()  # process-wide: activation buffers reused from the heap, not faulted in per layer
        t0 = time.perf_counter()
        f = GGUFFile(path)
        cfg = ModelConfig.from_gguf(f)
        int8 = head_type == "int8"
        quantize_head = int8 or (screen_head and screening_possible())
        if no_mmap:
            f.copy_to_anonymous(sparse=sparse_tensors(f, quantize_head))
        tl2_shapes = {t.np_shape for t in f.tensors.values() if t.type_id == GGMLType.TL2}
        tiling = resolve_tiling(tl2_shapes, f.metadata, path, tl2_config) if tl2_shapes else {}
        weights = load_weights(f, cfg, tiling, quantize_head=quantize_head)
        if int8:
            if weights.screen is None:
                raise ValueError(f"the int8 head needs an F16 output head, this one is {weights.output.source_type}")
            weights.output, weights.screen = int8_head(weights.output, weights.screen), None
        if promote:
            f.promote(sparse_tensors(f, quantize_head),
                      also=[] if weights.repack_map is None else [(weights.repack_map, weights.repack_skip)])
        model = cls(f, cfg, weights, cache_type)
        model.load_ms = (time.perf_counter() - t0) * 1000
        log.info("loaded %s (%s, %d layers, %d vocab) in %.0f ms", path, cfg.arch, cfg.n_layer, cfg.n_vocab,
                 model.load_ms)
        return model

    @cached_property
    def tokenizer(self):
        from .tokenizer import Tokenizer
        return Tokenizer.from_gguf_metadata(self.gguf.metadata)

    @cached_property
    def chat_template(self):
        from .chat_template import ChatTemplate
        return ChatTemplate.from_gguf_metadata(self.gguf.metadata, self.tokenizer)

    @property
    def max_positions(self) -> int:
        return self._cos.shape[0]

    def new_kv_cache(self, n_blocks: int, block_size: int = 16) -> KVCache:
        c = self.config
        return KVCache.allocate(c.n_layer, n_blocks, block_size, c.n_kv_head, c.head_dim, self.cache_type)

    def forward(self, batch: Batch, kv: KVCache, heads: list[TopRequest | None] | None = None) -> np.ndarray:
        """-> logits f32[len(batch.logit_rows), n_vocab]. heads[r] (with a screened head): row r needs only the
        exact logits a TopRequest names; the rest of that row may come back as -inf (bitnet_py.screened_head)."""
        c, W = self.config, self.weights
        tokens = np.ascontiguousarray(batch.tokens, dtype=np.int32)
        pos = np.ascontiguousarray(batch.positions, dtype=np.int32)
        seq = np.ascontiguousarray(batch.seq_index, dtype=np.int32)
        tables = np.ascontiguousarray(batch.block_tables, dtype=np.int32)
        T = tokens.shape[0]
        if pos.size and pos.max() >= self.max_positions:
            raise ValueError(f"position {int(pos.max())} beyond the model's context ({self.max_positions})")
        bs = kv.block_size
        slots = tables[seq, pos // bs].astype(np.int64) * bs + pos % bs  # i64[T]
        f32 = kv.is_f32  # float32 cache: no f16 roundings anywhere (float32-framework arithmetic)
        # bitnet.cpp rounds attention probabilities to f16 in one-token calls: per sequence here, so that a
        # sequence's results do not depend on what else is in the batch
        round_probs = (np.bincount(seq, minlength=tables.shape[0]) == 1) & (not f32)  # bool[S]
        scale = np.float32(1.0 / np.sqrt(c.head_dim))
        n_threads = numba.get_num_threads()  # this thread's: sizes the kernels' tasks
        attention = (choose_attention(T, c.n_head, c.n_kv_head, f32, int(pos.max()) + 1 if T else 0,
                                      n_threads, float(pos.mean()) + 1 if T else 0.0)
                     if kernel_config.FAST_ATTENTION else paged_attention)  # one choice for all layers
        x = embedding_rows(self.gguf, W.token_embd, tokens)  # f32[T, E]
        x = np.array(x, dtype=np.float32, order="C")
        h = np.empty_like(x)
        steps = None if f32 or T > LAYER_STEPS_MAX_TOKENS else self._steps
        layers = W.layers
        split = attention is attention_split.paged_attention_split_g4
        if (steps is not None and self._region is not None and kernel_config.FAST_ATTENTION
                and T <= layer_region.MAX_TOKENS and (T == 1 or not split)):
            layer_region.decode_step_layers(x, *self._region, pos, self._cos, self._sin, c.traits.rope_neox,
                                             c.rope_dims, slots, kv.k, kv.v, seq, tables, bs, round_probs, scale,
                                             split, c.n_head, n_threads)  # all layers, one parallel region
            layers = ()
        elif steps is not None and self._stack is not None and kernel_config.FAST_ATTENTION:  # all layers, one call
            layer_steps.decode_layers(x, *self._stack, pos, self._cos, self._sin, c.traits.rope_neox, c.rope_dims,
                                      slots, kv.k, kv.v, seq, tables, bs, round_probs, scale, self._lut, split,
                                      attention_fast.token_tile(T, c.n_kv_head, n_threads), c.n_head, n_threads)
            layers = ()
        for il, L in enumerate(layers):
            if steps is not None:  # two compiled calls around attention, same kernels as below
                pre, post = steps[il]
                q = np.empty((T, c.n_head, c.head_dim), np.float32)
                layer_steps.attention_inputs(x, *pre, pos, self._cos, self._sin, c.traits.rope_neox, c.rope_dims,
                                             slots, kv.k[il], kv.v[il], q, n_threads)
                attn = np.empty_like(q)
                attention(q, kv.k[il], kv.v[il], self._empty32, self._empty32, False, pos, seq, tables, bs,
                          round_probs, scale, self._lut, attn)
                layer_steps.attention_output_and_ffn(x, attn.reshape(T, c.q_dim), *post, n_threads)
                continue
            norm(x, L.attn_norm, c.rms_eps, h)
            if self._fuse_qkv[il]:
                q, k, v = fused_linear([L.wq, L.wk, L.wv], h, n_threads)
            else:
                qa = shared_quantization([L.wq, L.wk, L.wv], h)
                q, k, v = (linear(L.wq, h, qa, n_threads=n_threads), linear(L.wk, h, qa, n_threads=n_threads),
                           linear(L.wv, h, qa, n_threads=n_threads))
            q = q.reshape(T, c.n_head, c.head_dim)
            k = k.reshape(T, c.n_kv_head, c.head_dim)
            v = v.reshape(T, c.n_kv_head, c.head_dim)
            if f32:
                rope_apply(q, pos, self._cos, self._sin, c.traits.rope_neox, c.rope_dims)
                rope_apply(k, pos, self._cos, self._sin, c.traits.rope_neox, c.rope_dims)
                kv.k[il][:, slots] = k.transpose(1, 0, 2)
                kv.v[il][:, slots] = v.transpose(1, 0, 2)
                k16 = v16 = self._empty16
                k32, v32 = kv.k[il], kv.v[il]
            else:  # rope, f16 K/V into the cache, Q rounded to f16 (ggml converts Q to f16 for Q.K)
                k16, v16 = kv.k[il], kv.v[il]
                rope_store_f16(q, k, v, pos, self._cos, self._sin, c.traits.rope_neox, c.rope_dims, slots, k16, v16)
                k32 = v32 = self._empty32
            attn = np.empty_like(q)
            attention(q, k16, v16, k32, v32, f32, pos, seq, tables, bs, round_probs, scale, self._lut, attn)
            a = attn.reshape(T, c.q_dim)
            if L.attn_sub_norm is not None:
                norm(a, L.attn_sub_norm, c.rms_eps, a)
            x += linear(L.wo, a, n_threads=n_threads)
            norm(x, L.ffn_norm, c.rms_eps, h)
            if self._fuse_ffn[il]:
                gate, up = fused_linear([L.w_gate, L.w_up], h, n_threads)
            else:
                qa = shared_quantization([L.w_gate, L.w_up], h)
                gate, up = (linear(L.w_gate, h, qa, n_threads=n_threads),
                            linear(L.w_up, h, qa, n_threads=n_threads))
            (self._act_parallel if T >= PARALLEL_ROWS else self._act)(gate, up, gate)
            if L.ffn_sub_norm is not None:
                norm(gate, L.ffn_sub_norm, c.rms_eps, gate)
            x += linear(L.w_down, gate, n_threads=n_threads)
        rows = np.ascontiguousarray(x[np.asarray(batch.logit_rows, dtype=np.int64)])
        norm(rows, W.output_norm, c.rms_eps, rows)
        if self._screened_head is not None and (heads is None or not all(can_screen(h, c.n_vocab) for h in heads)):
            self.gguf.promote_tensor(self._screened_head)  # once; nothing where the weights are not promoted
        if heads is not None and W.screen is not None and any(h is not None for h in heads):
            if len(heads) != rows.shape[0]:
                raise ValueError(f"{len(heads)} head requests for {rows.shape[0]} logit rows")
            if not f32:
                round_rows_f16(rows.reshape(-1), rows.reshape(-1))  # as linear() does for f16 weights
            return screened_logits(W.output.f16_bits, W.screen, rows, heads, self.gguf.row_file(self._screened_head))
        return linear(W.output, rows, round_f16=not f32, n_threads=n_threads)
