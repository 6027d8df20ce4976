"""Gated FFN activations: silu(g) * u (bitnet, llama) and relu(g)^2 * u (bitnet-b1.58), float32.
`silu_mul` / `relu2_mul` run on one thread (decode batches: cheaper than a parallel region);
the `_parallel` twins split rows over threads (prefill)."""
import math

import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL


@njit(**JIT)
def _silu_row(gate, up, out, t):
    for i in range(gate.shape[1]):
        g = gate[t, i]
        out[t, i] = (g / (np.float32(1.0) + np.float32(math.exp(-g)))) * up[t, i]


@njit(**JIT)
def _relu2_row(gate, up, out, t):
    for i in range(gate.shape[1]):
        g = gate[t, i]
        if g < 0:
            g = np.float32(0.0)
        out[t, i] = (g * g) * up[t, i]


@njit(**JIT)
def silu_mul(gate, up, out):
    """gate, up: f32[T, F] -> out: f32[T, F] = gate / (1 + exp(-gate)) * up (out may alias gate)."""
    for t in range(gate.shape[0]):
        _silu_row(gate, up, out, t)


@njit(**JIT)
def relu2_mul(gate, up, out):
    """gate, up: f32[T, F] -> out: f32[T, F] = max(gate, 0)^2 * up (out may alias gate)."""
    for t in range(gate.shape[0]):
        _relu2_row(gate, up, out, t)


@njit(**JIT_PARALLEL)
def silu_mul_parallel(gate, up, out):
    """Same as silu_mul, rows split over threads."""
    for t in prange(gate.shape[0]):
        _silu_row(gate, up, out, t)


@njit(**JIT_PARALLEL)
def relu2_mul_parallel(gate, up, out):
    """Same as relu2_mul, rows split over threads."""
    for t in prange(gate.shape[0]):
        _relu2_row(gate, up, out, t)
