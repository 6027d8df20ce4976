"""Which ternary matmul implementation runs for a weight shape (all give identical results).

`ternary_kernels(M, K)` -> TernaryKernels(name, matmul, matmul_multi), both with i2s_matmul's signatures.
`auto` picks per shape from measurements (scripts/bench_kernels.py prints them for the host):
- hosts with AVX2: the SIMD multiply-add kernel for every shape (18-40x faster than the lookup-table kernel
  at the 2B-4T shapes 2560x2560, 6912x2560, 2560x6912 and T = 1, 8, one thread); on hosts with AMX it runs steps
  of 16+ tokens on AMX tiles (kernels.amx; 3.8x the VNNI loop at 128 tokens);
- other hosts: the plain multiply-add loop (1.2-1.5x faster than the lookup-table kernel at those shapes:
  scalar table loads cost more than the multiply-adds they replace).
BITNET_PY_TERNARY_KERNEL overrides the choice (kernels/config.py).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from . import config
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


def ternary_kernels(m: int, k: int, choice: str | None = None) -> TernaryKernels:
    choice = choice or config.TERNARY_KERNEL
    if choice == "mad":
        choice = "simd"
    if choice == "auto":
        choice = "simd" if HAVE_AVX2 else "plain"
    if choice not in KERNELS:
        raise ValueError(f"BITNET_PY_TERNARY_KERNEL must be auto, mad, plain or lut, got {choice!r}")
    return KERNELS[choice]
