"""A transformer layer as two kernel calls around attention, for models whose seven matmuls are all I2_S-style
ternary (one scale per tensor, one activation floor; in the base-3 layout on hosts with kernels.b3_simd.HAVE_B3,
whose matmuls these calls then make) and whose KV cache is float16.

A decode step is ~120 small kernel calls; between them the model's Python loop (dispatch, array allocation,
weight-type checks) cost ~55 us per layer, ~1.7 ms per token of a 30-layer model, more than the parallel
launches themselves. Here the same kernels run in the same order from compiled code:

- `attention_inputs`: h = rms(x) * attn_norm; q, k, v = Wq h, Wk h, Wv h (one quantization of h, one fused
  parallel matmul); rope on q and k, k and v stored as float16, q rounded to float16 (kernels.kv_store);
- `attention_output_and_ffn`: [a = rms(a) * attn_sub_norm]; x += Wo a; h = rms(x) * ffn_norm;
  f = act(Wgate h) * (Wup h); [f = rms(f) * ffn_sub_norm]; x += Wdown f.

`decode_layers` runs all layers of a step, attention included (kernels.attention_fast's tiled kernel or
kernels.attention_split's), in one call: the model's loop over 30 layers of three calls each left ~1.5 ms per
token of a 2B-4T decode outside the kernels (Python, argument unboxing, its data cold after the weight streams).

The model uses them for steps of up to LAYER_STEPS_MAX_TOKENS tokens (decode; bitnet_py/model.py).
Results are bit-identical to bitnet_py.model's general path (the same kernels, the same row-count thresholds
for their parallel forms; tested). Sub-norm weights of length 0 mean the arch has none (llama). `HAVE_LAYER_STEPS`
is False on hosts without F16C (kernels.kv_store is numpy code there).
"""
import numpy as np
from numba import njit

from .activations import relu2_mul, relu2_mul_parallel, silu_mul, silu_mul_parallel
from .config import JIT
from .kv_store import rope_store_f16
from .norms import rms_norm, rms_norm_parallel
from .quantize import quantize_rows_i8, quantize_rows_i8_parallel
from .simd import HAVE_F16C
from .b3_simd import HAVE_B3, padded_k

if HAVE_B3:  # the weights are in the base-3 layout on these hosts (kernels.select.b3_enabled)
    from .b3_matmul import b3_matmul as ternary_matmul, b3_matmul_multi as ternary_matmul_multi

    @njit(**JIT)
    def _rows_of(packed, k):
        """Rows of a packed ternary weight with k columns (base-3: 5 weights per byte, k padded)."""
        return packed.shape[0] * 5 // padded_k(k)
else:
    from .ternary_matmul import i2s_matmul as ternary_matmul, i2s_matmul_multi as ternary_matmul_multi

    @njit(**JIT)
    def _rows_of(packed, k):
        """Rows of a packed ternary weight with k columns (I2_S: 4 weights per byte)."""
        return packed.shape[0] * 4 // k

TERNARY_KERNEL = "b3" if HAVE_B3 else "simd"  # kernels.select's name for the matmuls these steps call
PARALLEL_ROWS = 4  # the row-wise kernels (norms, quantization, activation) go parallel from this many tokens
HAVE_LAYER_STEPS = HAVE_F16C


@njit(**JIT)
def _norm(x, weight, eps, out):
    if x.shape[0] >= PARALLEL_ROWS:
        rms_norm_parallel(x, weight, eps, out)
    else:
        rms_norm(x, weight, eps, out)


@njit(**JIT)
def _quantize(x, floor):
    """x: f32[T, K] -> (i8[T, K], f32[T] scales, i32[T] sums), as bitnet_py.model.quantize_activation."""
    T, K = x.shape
    q = np.empty((T, K), np.int8)
    scales = np.empty(T, np.float32)
    sums = np.empty(T, np.int32)
    if T >= PARALLEL_ROWS:
        quantize_rows_i8_parallel(x, floor, q, scales, sums)
    else:
        quantize_rows_i8(x, floor, q, scales, sums)
    return q, scales, sums


@njit(**JIT)
def _add_linear(x, packed, scale, a, floor, n_threads):
    """x: f32[T, M] += W a, W ternary (u8[M*K/4] I2_S, per-tensor scale), a: f32[T, K]."""
    q, scales, sums = _quantize(a, floor)
    y = np.empty_like(x)
    ternary_matmul(packed, q, scales, sums, scale, y, n_threads)
    x += y


if HAVE_LAYER_STEPS:
    @njit(**JIT)
    def attention_inputs(x, attn_norm, eps, wq, wk, wv, sq, sk, sv, floor, positions, cos, sin, neox, n_dims,
                         slots, k_cache, v_cache, q_out, n_threads):
        """x: f32[T, E]; wq, wk, wv: u8 I2_S; sq, sk, sv: f32 scales; positions: i32[T]; slots: i64[T]
        -> q_out: f32[T, H, D] (roped, float16-rounded); k_cache, v_cache: u16[KVH, n_slots, D] rows [:, slots[t]].
        n_threads: numba's thread count (sizes the matmuls' row tasks)."""
        T = x.shape[0]
        KVH, D = k_cache.shape[0], k_cache.shape[2]
        h = np.empty_like(x)
        _norm(x, attn_norm, eps, h)
        q8, scales, sums = _quantize(h, floor)
        k = np.empty((T, KVH * D), np.float32)
        v = np.empty((T, KVH * D), np.float32)
        q2 = q_out.reshape(T, q_out.shape[1] * q_out.shape[2])  # f32[T, H*D], a view
        ternary_matmul_multi(wq, wk, wv, q8, scales, sums, sq, sk, sv, q2, k, v, n_threads)
        rope_store_f16(q_out, k.reshape(T, KVH, D), v.reshape(T, KVH, D), positions, cos, sin, neox, n_dims, slots,
                       k_cache, v_cache)

    @njit(**JIT)
    def attention_output_and_ffn(x, attn, attn_sub_norm, wo, so, ffn_norm, w_gate, w_up, w_down, s_gate, s_up,
                                 s_down, ffn_sub_norm, floor, eps, relu2, n_threads):
        """x: f32[T, E] (updated in place); attn: f32[T, H*D] (attention output; sub-normed in place);
        w_*: u8 I2_S; s_*: f32 scales; *_sub_norm: f32[n] or f32[0] (none); relu2: squared-ReLU gate, else SiLU."""
        T = x.shape[0]
        if attn_sub_norm.shape[0]:
            _norm(attn, attn_sub_norm, eps, attn)
        _add_linear(x, wo, so, attn, floor, n_threads)
        h = np.empty_like(x)
        _norm(x, ffn_norm, eps, h)
        q8, scales, sums = _quantize(h, floor)
        F = _rows_of(w_gate, x.shape[1])
        gate = np.empty((T, F), np.float32)
        up = np.empty((T, F), np.float32)
        ternary_matmul_multi(w_gate, w_up, np.empty(0, np.uint8), q8, scales, sums, s_gate, s_up, s_up, gate, up,
                         np.empty((T, 0), np.float32), n_threads)
        if relu2:
            if T >= PARALLEL_ROWS:
                relu2_mul_parallel(gate, up, gate)
            else:
                relu2_mul(gate, up, gate)
        elif T >= PARALLEL_ROWS:
            silu_mul_parallel(gate, up, gate)
        else:
            silu_mul(gate, up, gate)
        if ffn_sub_norm.shape[0]:
            _norm(gate, ffn_sub_norm, eps, gate)
        _add_linear(x, w_down, s_down, gate, floor, n_threads)

    from .attention_fast import paged_attention_tiled  # both exist where HAVE_LAYER_STEPS (F16C)
    from .attention_split import paged_attention_split_g4

    _inputs_step, _output_step = attention_inputs, attention_output_and_ffn  # what decode_layers compiles in

    @njit(**JIT)
    def decode_layers(x, pres, posts, positions, cos, sin, neox, n_dims, slots, k_caches, v_caches, seq_index,
                      block_tables, block_size, round_probs, scale, lut, split, tile, n_head, n_threads):
        """Every layer of a step, as the model's loop calls them: pres[l] / posts[l] are the weight arguments of
        layer l's attention_inputs / attention_output_and_ffn (tuples of one type: a UniTuple over layers);
        k_caches, v_caches: u16[L, KVH, n_slots, D]; attention by paged_attention_split_g4 where `split`, else
        paged_attention_tiled with `tile` tokens per task (kernels.attention_fast.token_tile). x: f32[T, E] is
        updated in place."""
        T = x.shape[0]
        D = k_caches.shape[3]
        none = np.zeros((k_caches.shape[1], 0, D), np.float32)
        for il in range(len(pres)):
            p, o = pres[il], posts[il]
            q = np.empty((T, n_head, D), np.float32)
            _inputs_step(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], positions, cos, sin, neox, n_dims,
                         slots, k_caches[il], v_caches[il], q, n_threads)
            attn = np.empty_like(q)
            if split:
                paged_attention_split_g4(q, k_caches[il], v_caches[il], none, none, False, positions, seq_index,
                                         block_tables, block_size, round_probs, scale, lut, attn)
            else:
                paged_attention_tiled(q, k_caches[il], v_caches[il], none, none, False, positions, seq_index,
                                      block_tables, block_size, round_probs, scale, attn, tile)
            _output_step(x, attn.reshape(T, n_head * D), o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9],
                         o[10], o[11], o[12], o[13], n_threads)
