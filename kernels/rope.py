"""Rotary position embeddings with precomputed cos/sin tables.

Tables follow ggml: theta_0 = pos, theta_{i+1} = theta_i * base^(-2/d) in float32, angle = freq_scale * theta,
cos/sin in float32. NORM style rotates adjacent pairs (2i, 2i+1); NEOX style rotates (i, i + d/2).

The tables are the same bits on every host. numpy dispatches float32 `power` and float64 `cos`/`sin` to SVML on
AVX-512 hosts (Sapphire Rapids, Genoa), whose results can differ from the C library's by an ulp or more. One float32
ulp in base^(-2/d) moves every angle: on a Sapphire Rapids host, with numpy's power, only 2 of the 8 tiny-bitnet TL2
prompts stayed bit-close to bitnet.cpp's logits (7 on AVX2 hosts; tests/test_parity_bitnetcpp.py), and moving
base^(-2/d) by one ulp on an AVX2 host gives the same 2. So base^(-2/d) is the C library's `powf` (the function ggml
calls), and a cos/sin value whose float64 result lies within a few float64 ulps of a float32 rounding midpoint,
where an ulp of host difference could round it the other way, is recomputed with the C library's `cos`/`sin`
(`math`).
"""
import ctypes
import ctypes.util
import functools
import math

import numpy as np
from numba import njit

from .config import JIT

TABLE_CHUNK = 1024  # positions per block of rope_tables
MIDPOINT_GUARD_ULPS = 16  # float64 ulps: SIMD cos/sin libraries stay within ~4 of the correctly rounded value
_DROPPED_MASK = (1 << 29) - 1  # the float64 mantissa bits a float32 rounding drops
_MIDPOINT = 1 << 28
_EXPONENT_MASK = 0x7FF << 52
_F32_MIN_EXPONENT_BITS = (1023 - 126) << 52  # float64 exponent field of 2^-126, float32's smallest normal


@functools.lru_cache(maxsize=1)
def _c_powf():
    """The C library's powf(float, float) -> float, or None where it cannot be loaded."""
    for find in (lambda: "libm.so.6", lambda: ctypes.util.find_library("m"), lambda: None):  # glibc's name
        try:                                                                  # first: find_library forks
            powf = ctypes.CDLL(find()).powf
        except (OSError, AttributeError, TypeError):
            continue
        powf.restype = ctypes.c_float
        powf.argtypes = [ctypes.c_float, ctypes.c_float]
        return powf
    return None


def theta_scale(base: float, n_dims: int) -> np.float32:
    """base^(-2/n_dims) as ggml computes it: powf(base, -2.0f/n_dims) in float32 (the C library's, not numpy's)."""
    exponent = np.float32(-2.0) / np.float32(n_dims)
    powf = _c_powf()
    if powf is not None:
        return np.float32(powf(float(np.float32(base)), float(exponent)))
    return np.float32(math.pow(float(np.float32(base)), float(exponent)))  # correctly rounded but for near-ties


def _round_f32(values: np.ndarray, angles: np.ndarray, exact) -> np.ndarray:
    """float64 values of exact(angles) -> float32; values near a float32 rounding midpoint are recomputed with
    exact (the C library) so that no ulp of difference between numpy's SIMD routines and it can decide them."""
    out = values.astype(np.float32)
    bits = values.view(np.uint64)
    # float64 -> float32 drops the 29 low mantissa bits (normal float32 range); 2^28 there is the midpoint:
    # near <=> |dropped - 2^28| <= guard, as one unsigned compare after a wrapping subtract
    dropped = np.bitwise_and(bits, np.uint64(_DROPPED_MASK))
    np.subtract(dropped, np.uint64(_MIDPOINT - MIDPOINT_GUARD_ULPS), out=dropped)
    near = dropped <= np.uint64(2 * MIDPOINT_GUARD_ULPS)
    # zeros and the float32-subnormal range (exponent below float32's): decided by the C library too
    near |= np.bitwise_and(bits, np.uint64(_EXPONENT_MASK)) < np.uint64(_F32_MIN_EXPONENT_BITS)
    for i in np.flatnonzero(near):
        out.flat[i] = np.float32(exact(float(angles.flat[i])))
    return out


def cos_sin_f32(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """angles: f32[...] -> cos, sin: f32[...], rounded from float64 (the same bits on every host)."""
    a64 = angles.astype(np.float64)
    return _round_f32(np.cos(a64), a64, math.cos), _round_f32(np.sin(a64), a64, math.sin)


def rope_tables(n_pos: int, n_dims: int, base: float, freq_scale: float = 1.0):
    """-> cos, sin: f32[n_pos, n_dims/2] (ggml's repeated-multiplication theta, float32), built TABLE_CHUNK
    positions at a time (the float64 passes stay in cache: 3x faster than whole tables at 128k positions)."""
    half = n_dims // 2
    scale = theta_scale(base, n_dims)
    cos = np.empty((n_pos, half), dtype=np.float32)
    sin = np.empty((n_pos, half), dtype=np.float32)
    for p0 in range(0, n_pos, TABLE_CHUNK):
        theta = np.arange(p0, min(n_pos, p0 + TABLE_CHUNK), dtype=np.float32)  # f32[chunk]: theta of pair i
        angles = np.empty((theta.shape[0], half), dtype=np.float32)
        for i in range(half):
            angles[:, i] = theta if freq_scale == 1.0 else np.float32(freq_scale) * theta
            theta *= scale
        cos[p0:p0 + theta.shape[0]], sin[p0:p0 + theta.shape[0]] = cos_sin_f32(angles)
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
