"""Atomic operations on int64 array elements for Numba kernels (`numba.extending.intrinsic`, LLVM atomics):
the shared task ranges that let the threads of a parallel loop take work from each other (kernels.tasks).

- `atomic_load(a, i)`: a[i], read atomically (acquire), never cached in a register across loop iterations.
- `atomic_store(a, i, v)`: a[i] = v, atomically (release).
- `compare_and_swap(a, i, expected, new)`: a[i] = new if a[i] == expected, atomically -> whether it did.
- `atomic_add(a, i, v)`: a[i] += v, atomically (acquire and release) -> the old value.
"""
from numba import types
from numba.extending import intrinsic


def _element(context, builder, arrty, arr, index, index_ty):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(ary.data, [context.cast(builder, index, index_ty, types.int64)])


@intrinsic
def atomic_load(typingctx, a, i):
    sig = types.int64(a, i)

    def codegen(context, builder, signature, args):
        ptr = _element(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def atomic_store(typingctx, a, i, v):
    sig = types.void(a, i, v)

    def codegen(context, builder, signature, args):
        ptr = _element(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(value, ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def compare_and_swap(typingctx, a, i, expected, new):
    sig = types.boolean(a, i, expected, new)

    def codegen(context, builder, signature, args):
        at = signature.args
        ptr = _element(context, builder, at[0], args[0], args[1], at[1])
        old = context.cast(builder, args[2], at[2], types.int64)
        value = context.cast(builder, args[3], at[3], types.int64)
        pair = builder.cmpxchg(ptr, old, value, "acq_rel", "acquire")
        return builder.extract_value(pair, 1)

    return sig, codegen


@intrinsic
def atomic_add(typingctx, a, i, v):
    sig = types.int64(a, i, v)

    def codegen(context, builder, signature, args):
        ptr = _element(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, value, "acq_rel")

    return sig, codegen
