"""Gated FFN activations: silu(g) * u (bitnet, llama) and relu(g)^2 * u (bitnet-b1.58), float32.
Single-threaded: they are a small part of a step and cheaper than a parallel region for decode batches."""
import math

import numpy as np
from numba import njit

from .config import JIT


@njit(**JIT)
def silu_mul(gate, up, out):
    """gate, up: f32[T, F] -> out: f32[T, F] = gate / (1 + exp(-gate)) * up (out may alias gate)."""
    T, F = gate.shape
    for t in range(T):
        for i in range(F):
            g = gate[t, i]
            out[t, i] = (g / (np.float32(1.0) + np.float32(math.exp(-g)))) * up[t, i]


@njit(**JIT)
def relu2_mul(gate, up, out):
    """gate, up: f32[T, F] -> out: f32[T, F] = max(gate, 0)^2 * up (out may alias gate)."""
    T, F = gate.shape
    for t in range(T):
        for i in range(F):
            g = gate[t, i]
            if g < 0:
                g = np.float32(0.0)
            out[t, i] = (g * g) * up[t, i]
