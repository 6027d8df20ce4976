"""Gated FFN activations, in place on the gate: silu(g) * u (bitnet, llama) and relu(g)^2 * u (bitnet-b1.58)."""
import math

import numpy as np
from numba import njit, prange

from .config import JIT_PARALLEL


@njit(**JIT_PARALLEL)
def silu_mul(gate, up, out):
    """gate, up: f32[T, F] -> out: f32[T, F] = gate / (1 + exp(-gate)) * up."""
    T, F = gate.shape
    for t in prange(T):
        for i in range(F):
            g = gate[t, i]
            out[t, i] = (g / (np.float32(1.0) + np.float32(math.exp(-g)))) * up[t, i]


@njit(**JIT_PARALLEL)
def relu2_mul(gate, up, out):
    """gate, up: f32[T, F] -> out: f32[T, F] = max(gate, 0)^2 * up."""
    T, F = gate.shape
    for t in prange(T):
        for i in range(F):
            g = gate[t, i]
            if g < 0:
                g = np.float32(0.0)
            out[t, i] = (g * g) * up[t, i]
