"""Rotary position embeddings with precomputed cos/sin tables.

Tables follow ggml: theta_0 = pos, theta_{i+1} = theta_i * base^(-2/d) in float32, cos/sin in float32.
NORM style rotates adjacent pairs (2i, 2i+1); NEOX style rotates (i, i + d/2).
"""
import numpy as np
from numba import njit

from .config import JIT


def rope_tables(n_pos: int, n_dims: int, base: float, freq_scale: float = 1.0):
    """-> cos, sin: f32[n_pos, n_dims/2] (ggml's repeated-multiplication theta, float32)."""
    half = n_dims // 2
    theta_scale = np.float32(np.power(np.float32(base), np.float32(-2.0) / np.float32(n_dims), dtype=np.float32))
    theta = np.arange(n_pos, dtype=np.float32) * np.float32(freq_scale)
    cos = np.empty((n_pos, half), dtype=np.float32)
    sin = np.empty((n_pos, half), dtype=np.float32)
    for i in range(half):
        cos[:, i] = np.cos(theta.astype(np.float64)).astype(np.float32)
        sin[:, i] = np.sin(theta.astype(np.float64)).astype(np.float32)
        theta = (theta * theta_scale).astype(np.float32)
    return cos, sin


@njit(**JIT)
def rope_apply(x, positions, cos, sin, neox, n_dims):
    """In place, single-threaded (cheap). x: f32[T, H, D]; positions: i32[T]; cos, sin: f32[P, n_dims/2]; neox: bool."""
    T, H, D = x.shape
    half = n_dims // 2
    for t in range(T):
        p = positions[t]
        for h in range(H):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                if neox:
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * c - b * s
                    x[t, h, i + half] = a * s + b * c
                else:
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * c - b * s
                    x[t, h, 2 * i + 1] = a * s + b * c
