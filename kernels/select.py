"""Which ternary matmul implementation runs for a weight shape (all give identical results).

`ternary_kernels(M, K)` -> TernaryKernels(name, matmul, matmul_multi), both with i2s_matmul's signatures.
`auto` picks per shape from measurements (scripts/bench_kernels.py prints them for the host):
- hosts with AVX2: the SIMD multiply-add kernel for every shape (18-40x faster than the lookup-table kernel
  at the 2B-4T shapes 2560x2560, 6912x2560, 2560x6912 and T = 1, 8, one thread); on hosts with AMX it runs steps
  of 16+ tokens on AMX tiles (kernels.amx; 3.8x the VNNI loop at 128 tokens);
- other hosts: the plain multiply-add loop (1.2-1.5x faster than the lookup-table kernel at those shapes:
  scalar table loads cost more than the multiply-adds they replace).
BITNET_PY_TERNARY_KERNEL overrides the choice (kernels/config.py).

Hosts with AVX-512 VBMI + VNNI (`kernels.b3_simd.HAVE_B3`) keep the weights that the SIMD kernel would read in
the base-3 layout instead (1.6 bits per weight, repacked at load: bitnet_py.weights), read by kernels.b3_matmul;
`weight_kernels` picks by the weight's layout.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from . import config
from .b3_matmul import b3_matmul, b3_matmul_multi
from .b3_simd import HAVE_B3, TILE_ROWS
from .lut_matmul import lut_matmul, lut_matmul_multi
from .simd import HAVE_AVX2
from .ternary_matmul import i2s_matmul, i2s_matmul_multi, i2s_matmul_multi_plain, i2s_matmul_plain


class TernaryKernels(NamedTuple):
    name: str
    matmul: Callable
    matmul_multi: Callable


KERNELS = {
    "simd": TernaryKernels("simd", i2s_matmul, i2s_matmul_multi),  # == plain where the host has no AVX2
    "plain": TernaryKernels("plain", i2s_matmul_plain, i2s_matmul_multi_plain),
    "lut": TernaryKernels("lut", lut_matmul, lut_matmul_multi),
}
B3_KERNELS = TernaryKernels("b3", b3_matmul, b3_matmul_multi)  # weights in kernels.b3_simd's layout only


def ternary_kernels(m: int, k: int, choice: str | None = None) -> TernaryKernels:
    choice = choice or config.TERNARY_KERNEL
    if choice == "mad":
        choice = "simd"
    if choice == "auto":
        choice = "simd" if HAVE_AVX2 else "plain"
    if choice not in KERNELS:
        raise ValueError(f"BITNET_PY_TERNARY_KERNEL must be auto, mad, plain or lut, got {choice!r}")
    return KERNELS[choice]


def b3_enabled() -> bool:
    """Whether per-tensor-scaled ternary weights go to the base-3 layout at load: hosts with HAVE_B3 where the
    SIMD kernel is the choice (BITNET_PY_TERNARY_KERNEL auto or mad)."""
    return HAVE_B3 and ternary_kernels(TILE_ROWS, 128).name == "simd"


def use_b3(m: int, k: int) -> bool:
    """b3_enabled, for a weight of M rows (whole tiles of 16)."""
    return m % TILE_ROWS == 0 and b3_enabled()


def weight_kernels(layout: str, m: int, k: int) -> TernaryKernels:
    """The kernels for a weight in `layout` ("b3" or "i2_s")."""
    return B3_KERNELS if layout == "b3" else ternary_kernels(m, k)
