"""float16 helpers for Numba code, which has no float16 arithmetic on the CPU: values travel as uint16 bits.

- `f16_lut()`: f32[65536] table, bits -> value (exact), for gathers in small loops (attention).
- `f16_bits_to_f32(bits, out_u32)`: vectorizable bit conversion for long rows (output heads); `out_u32` is a
  uint32 view of the float32 destination.
- `round_to_f16(x)`: float32 -> nearest float16 value (ties to even), as float32; finite inputs below 65504.
- `round_rows_f16(x, out)`: f32[N] -> f32[N] values rounded to float16 (the f16 head's input), exactly numpy's
  `.astype(np.float16).astype(np.float32)` (ties to even, overflow to inf). Hardware conversion where the host
  has it (10-30x numpy's), else numpy. KV stores and Q rounding: kernels/kv_store.py.
"""
import math

import numpy as np
from numba import njit

from .config import JIT
from .simd import HAVE_F16C

_TWO_POW_112 = np.float32(2.0 ** 112)


def f16_lut() -> np.ndarray:
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(**JIT)
def f16_bits_to_f32(bits, out_u32):
    """bits: u16[N] -> out_u32: u32[N]; the float32 view of out_u32 then holds value * 2^-112, and the
    caller multiplies it by 2^112 (exact for normal and subnormal halves; inf/nan not handled)."""
    for i in range(bits.shape[0]):
        h = np.uint32(bits[i])
        out_u32[i] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))


@njit(**JIT)
def round_to_f16(x):
    """Round a float32 to the nearest float16-representable value (ties to even), returned as float32."""
    a = abs(x)
    if a == 0.0:
        return x
    m, e = math.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    e = e - 1  # a in [2^e, 2^(e+1))
    if e < -14:
        e = -14  # subnormal halves: fixed step 2^-24
    magic = np.float32(math.ldexp(1.5, e + 13))  # adding it rounds to a multiple of 2^(e-10)
    r = (np.float32(a) + magic) - magic
    return r if x > 0 else -r


if HAVE_F16C:
    from .simd import f16_to_f32, f32_to_f16_bits

    @njit(**JIT)
    def round_rows_f16(x, out):
        """x: f32[N] -> out: f32[N] (may alias x), each value rounded to the nearest float16."""
        for i in range(x.shape[0]):
            out[i] = f16_to_f32(f32_to_f16_bits(x[i]))
else:
    def round_rows_f16(x, out):
        """x: f32[N] -> out: f32[N] (may alias x), each value rounded to the nearest float16 (numpy)."""
        out[:] = x.astype(np.float16).astype(np.float32)
