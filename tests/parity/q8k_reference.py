"""Numpy reference of upstream ggml's TQ2_0 x Q8_K matmul (what llama.cpp computes for a TQ2_0 weight), used to
measure and pin down how our TQ1_0/TQ2_0 arithmetic differs from upstream's. Not used by the engine.

Upstream (ggml-quants.c quantize_row_q8_K_ref, ggml-cpu ggml_vec_dot_tq2_0_q8_K), per token row x and per block
of 256 inputs:
    amax = max |x_j| over the block, max = the x_j where it is first reached (signed)
    amax == 0: d_x = 0, q = 0
    else: iscale = float32(-127 / max); q_j = min(127, round_half_even(float32(iscale * x_j))); d_x = float32(1/iscale)
    y_m = sum over blocks b (in order) of float32(sumi_b) * float32(d_w[m, b] * d_x[b]),
    sumi_b = sum_j (code_mj - 1) * q_j   (integer, exact)
The engine now computes exactly this (kernels/q8k.py); this slow copy stays as the reference its tests use.
"""
from __future__ import annotations

import numpy as np

from bitnet_py.gguf.ternary_unpack import unpack_i2s
from bitnet_py.weights import TernaryWeight

QK_K = 256


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: f32[T, K] -> (q int32[T, K], d f32[T, K/256])."""
    T, K = x.shape
    xb = x.astype(np.float32).reshape(T, K // QK_K, QK_K)
    first = np.abs(xb).argmax(axis=-1)  # first maximum, as C's strict `>`
    mx = np.take_along_axis(xb, first[..., None], axis=-1)[..., 0]
    nonzero = mx != 0
    safe = np.where(nonzero, mx, np.float32(1))
    iscale = np.where(nonzero, np.float32(-127.0) / safe, np.float32(0)).astype(np.float32)
    q = np.minimum(127, np.rint((iscale[..., None] * xb).astype(np.float32))).astype(np.int32)
    d = np.where(nonzero, np.float32(1.0) / np.where(nonzero, iscale, np.float32(1)), np.float32(0))
    return q.reshape(T, K), d.astype(np.float32)


class Q8KLinear:
    """Replacement for bitnet_py.model.linear that computes block-scaled ternary weights (TQ1_0/TQ2_0) the
    upstream way and defers everything else to the original."""

    def __init__(self, original):
        self.original = original
        self._codes: dict[int, np.ndarray] = {}

    def codes(self, w: TernaryWeight) -> np.ndarray:
        if id(w) not in self._codes:  # the weight's I2_S-layout packed codes -> int32 ternary [M, K]
            ternary, _ = unpack_i2s(np.concatenate([w.packed, np.zeros(4, np.uint8)]), w.m, w.k)
            self._codes[id(w)] = ternary.astype(np.int32)
        return self._codes[id(w)]

    def __call__(self, w, x, qa=None, round_f16=True, n_threads=0):
        if not (isinstance(w, TernaryWeight) and w.block_scales is not None):
            return self.original(w, x, qa, round_f16, n_threads)
        q, d = quantize_q8_k(np.ascontiguousarray(x, dtype=np.float32))
        codes = self.codes(w)
        out = np.zeros((x.shape[0], w.m), np.float32)
        for b in range(w.k // QK_K):
            cols = slice(b * QK_K, (b + 1) * QK_K)
            sumi = q[:, cols] @ codes[:, cols].T  # exact int [T, M]
            scale = (d[:, b][:, None] * w.block_scales[:, b][None, :]).astype(np.float32)
            out = (out + sumi.astype(np.float32) * scale).astype(np.float32)
        return out
