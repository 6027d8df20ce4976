"""Arrays over memory given by address, and a polite wait, for kernels that run a whole decode step in one parallel
region (kernels.layer_region).

Numba cannot pass a tuple of arrays into a parallel loop's body (the loop is outlined into a gufunc whose
arguments must be arrays or scalars), and a model's 210 weight arrays are separate buffers (a map per repack
cache, an arena, the file). The caller passes their addresses and sizes as an int64 table instead, and keeps
the arrays alive for the call; `u8_at(address, n)` views one as u8[n].

`sched_yield` and `pread` are the C library's (resolved by name, so kernels that call them stay in the on-disk
cache). `pread(fd, address, n, offset)` takes the buffer as an integer address (`array.ctypes.data`): the same
register as a pointer in the x86-64 and AArch64 calling conventions.
"""
import numba
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .config import JIT

sched_yield = types.ExternalFunction("sched_yield", types.int32())
pread = types.ExternalFunction("pread", types.int64(types.int32, types.uint64, types.uint64, types.int64))


@intrinsic
def _u8_pointer(typingctx, address):
    sig = types.CPointer(types.uint8)(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))

    return sig, codegen


@njit(**JIT)
def u8_at(address, n):
    """u8[n] at `address` (an int64 from `array.ctypes.data`; the caller keeps that array alive)."""
    return numba.carray(_u8_pointer(address), (n,))
