"""The same bits on every host: no kernel whose results reach the logits lets LLVM pick a float summation order.

Fast-math reassociation lets LLVM vectorize a float sum at the width it prefers for the host (8 lanes on AVX2,
16 on Genoa), so the sum, and through the int8 activation quantization the tokens, could differ by host. Kernels
that need a vector order write it out (kernels/simd*.py intrinsics) instead. The rope tables' host independence
is tested in tests/test_rope_tables.py."""
import importlib
import pkgutil

from numba.core.registry import CPUDispatcher

import kernels

REORDERING = {"reassoc", "arcp", "afn", "fast"}
# kernels allowed to reassociate, and why their results cannot change the logits
ALLOWED = {
    "kernels.dense.f16_matmul_bits": "the f16 head on hosts without float16 conversion hardware (not x86 AVX2 hosts)",
    "kernels.dense.quantize_f16_rows_i8": "its float sums are the screened head's error bounds, rounded up past "
                                          "the error of any summation order",
    "kernels.membw.read_sum": "the bench's memory-bandwidth probe",
}


def _kernels():
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", obj


def test_no_kernel_reaching_the_logits_reassociates():
    kernels_seen = dict(_kernels())
    assert len(kernels_seen) > 50 and "kernels.attention_fast._dot" in kernels_seen
    reordering = {}
    for name, dispatcher in kernels_seen.items():
        flags = dispatcher.targetoptions.get("fastmath") or ()
        flags = REORDERING if flags is True else set(flags)
        if flags & REORDERING:
            reordering[name] = sorted(flags & REORDERING)
    assert set(reordering) - set(ALLOWED) == set(), f"kernels reassociating float sums: {reordering}"
    assert set(ALLOWED) <= set(reordering), "ALLOWED lists a kernel that no longer reassociates: drop it"
