"""One place for Numba compilation flags used by every kernel.

BITNET_PY_NO_CACHE=1 disables the on-disk cache (NUMBA_CACHE_DIR chooses where it lives).
Only "safe" fast-math flags are used where float results must match the reference order of operations:
`STRICT` kernels (activation quantization, norms) get none, reductions over exact integers don't care.
"""
import os

CACHE = os.environ.get("BITNET_PY_NO_CACHE", "") not in ("1", "true", "yes")
# Flags allowing vectorized reductions without reciprocal/approximate math (keeps divisions exact).
FASTMATH_REDUCE = {"reassoc", "nsz", "contract"}
FASTMATH_OFF = False

JIT = dict(cache=CACHE, nogil=True, fastmath=FASTMATH_OFF)
JIT_PARALLEL = dict(cache=CACHE, nogil=True, parallel=True, fastmath=FASTMATH_OFF)
JIT_REDUCE = dict(cache=CACHE, nogil=True, fastmath=FASTMATH_REDUCE)
JIT_REDUCE_PARALLEL = dict(cache=CACHE, nogil=True, parallel=True, fastmath=FASTMATH_REDUCE)
