"""exp(x) for x <= 0 in float32 arithmetic, written so that loops over it vectorize (softmax of attention).

x = n*ln2 + r with n = round(x / ln2) and |r| <= ln2/2 (ln2 split in a high part exact in float32 and a low
part), exp(r) by the degree-7 Taylor-like polynomial of the Cephes `expf` (coefficients fitted for this range),
2^n by building the float's exponent bits. Error <= 2 ulp against the exact value (tested on a dense sweep);
ggml's own SIMD softmax uses an approximation of the same quality. Below -87.3 (2^n no longer a normal float)
the result is 0: softmax terms that small never change a float32 sum that already holds the maximum (1.0).
Plain float32 steps, no fast-math: the same inputs give the same bits on every host with IEEE float32.
"""
import numpy as np
from numba import njit

from .config import JIT
from .simd import i32_as_f32

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # 8 significant bits: n * _LN2_HI is exact for |n| < 2^15
_LN2_LO = np.float32(-2.12194440e-4)
_MIN_X = np.float32(-87.3)
_C = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
      np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))


@njit(**JIT)
def expf_nonpositive(x):
    """x: float32 <= 0 -> float32 exp(x) (0 below -87.3)."""
    xc = max(x, _MIN_X)
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _C[0]
    p = p * r + _C[1]
    p = p * r + _C[2]
    p = p * r + _C[3]
    p = p * r + _C[4]
    p = p * r + _C[5]
    p = p * (r * r) + r + np.float32(1.0)
    two_n = i32_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))
    y = p * two_n
    return y if x >= _MIN_X else np.float32(0.0)
