"""Rotary embedding of Q and K, then the float16 KV-cache store and ggml's float16 rounding of Q, in one call
per layer (a decode step otherwise spends more time in Python between these small steps than in them).
Same arithmetic as kernels.rope.rope_apply and numpy's astype(np.float16). Hosts without hardware float16
conversion get the same steps through numpy."""
import numpy as np
from numba import njit

from .config import JIT
from .rope import rope_apply
from .simd import HAVE_F16C

if HAVE_F16C:
    from .simd import f16_to_f32, f32_to_f16_bits

    @njit(**JIT)
    def rope_store_f16(q, k, v, positions, cos, sin, neox, n_dims, slots, k_cache, v_cache):
        """q: f32[T, H, D], k, v: f32[T, KVH, D] (rope applied to q and k in place; q then rounded to float16
        values); positions: i32[T]; slots: i64[T] -> k_cache, v_cache: u16[KVH, n_slots, D] rows [:, slots[t]]."""
        rope_apply(q, positions, cos, sin, neox, n_dims)
        rope_apply(k, positions, cos, sin, neox, n_dims)
        T, KVH, D = k.shape
        for t in range(T):
            s = slots[t]
            for h in range(KVH):
                for d in range(D):
                    k_cache[h, s, d] = f32_to_f16_bits(k[t, h, d])
                    v_cache[h, s, d] = f32_to_f16_bits(v[t, h, d])
        H = q.shape[1]
        for t in range(T):
            for h in range(H):
                for d in range(D):
                    q[t, h, d] = f16_to_f32(f32_to_f16_bits(q[t, h, d]))
else:
    def rope_store_f16(q, k, v, positions, cos, sin, neox, n_dims, slots, k_cache, v_cache):
        """Same contract, numpy conversions."""
        rope_apply(q, positions, cos, sin, neox, n_dims)
        rope_apply(k, positions, cos, sin, neox, n_dims)
        k_cache[:, slots] = k.transpose(1, 0, 2).astype(np.float16).view(np.uint16)
        v_cache[:, slots] = v.transpose(1, 0, 2).astype(np.float16).view(np.uint16)
        q[...] = q.astype(np.float16).astype(np.float32)
