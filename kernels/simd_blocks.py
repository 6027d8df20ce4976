"""Per-block I2_S ternary dots for block-scaled weights (TQ1_0 / TQ2_0 repacked to I2_S's bytes; kernels.q8k), as
LLVM IR intrinsics built from the helpers of `kernels.simd` (AVX2 `vpmaddubsw`).

Upstream's arithmetic scales every 256-value block by its own float factor, so a row's dot is needed block by
block. Calling `i2s_dot{1,4}` once per block reduced each token's eight i32 lanes to one number per block (about
seven vector operations per token) and paid a call's loop set-up each time: the block-scaled matmul ran 1.5x
slower than I2_S's. Here one call walks the whole row and reduces four lane vectors at once with `vphaddd`
(four numbers from three horizontal adds, an extract and an add):

- `i2s_block_dots4(packed, w0, q, q0, q_stride, n_b, sums)`: four tokens (row t of flat `q` at `q0 + t*q_stride`),
  n_b 256-blocks of weights from byte `w0` of `packed`; `sums[4*b + t]` = sum(code * q) over block b (code in
  {0, 1, 2}: the caller subtracts the block sums of q). Weights unpacked once for the four tokens, one shift per
  code (as kernels.simd's four-row dot).
- `i2s_block_dots1(...)`: one token, `sums[b]`; four blocks reduced together, the last n_b % 4 one by one. One
  16-bit shift per 32 weight bytes (kernels.simd's one- and two-row unpacking).

Exact integers: an i16 lane holds at most 8 pair sums of one block (2 * 3 * 128 each, 6144; or 4 * (2 * 12 * 128)
= 12288 in the one-shift four-times sum), never saturated; an i32 block sum is at most 256 * 3 * 128.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .simd import (_I32, _V8I32, _as_i64, _block_products, _close_loop, _data_ptr, _get_or_insert, _lane_sums,
                   _open_loop, _reduce_add, dot_pointers)

_I64 = ir.IntType(64)
_V4I32 = ir.VectorType(_I32, 4)


def _c64(v):
    return ir.Constant(_I64, v)


def _reduce4(builder, vecs):
    """Four <8 x i32> -> <4 x i32> of their lane sums, in order (vphaddd twice, then the two 128-bit halves)."""
    phadd = _get_or_insert(builder.module, "llvm.x86.avx2.phadd.d", ir.FunctionType(_V8I32, [_V8I32, _V8I32]))
    both = builder.call(phadd, [builder.call(phadd, vecs[:2]), builder.call(phadd, vecs[2:])])
    lo = builder.shuffle_vector(both, both, ir.Constant(_V4I32, [ir.Constant(_I32, i) for i in range(4)]))
    hi = builder.shuffle_vector(both, both, ir.Constant(_V4I32, [ir.Constant(_I32, i) for i in range(4, 8)]))
    return builder.add(lo, hi)


def _block_builder(builder, n_tok, wbase, qbases):
    """-> block(b): the IR for 256-block b (an i64) of a row at wbase against n_tok activation rows (qbases),
    returning one <8 x i32> of lane sums per token."""
    one_shift = n_tok == 1  # two i16 sums per token fit the registers for one token, not for four

    def block(b):
        sums = [[None] * n_tok for _ in range(2 if one_shift else 1)]
        for half in range(2):  # the two 128-value I2_S blocks
            _block_products(builder, wbase, qbases, builder.add(builder.mul(b, _c64(2)), _c64(half)), sums,
                            one_shift, half == 0)
        return [_lane_sums(builder, sums[0][t], sums[1][t] if one_shift else None) for t in range(n_tok)]

    return block


@intrinsic
def i2s_block_dots1(typingctx, packed, w0, q, q0, q_stride, n_b, sums):
    """One token's block dots of one row: sums[b] = sum(code * q) over 256-block b (the caller subtracts q's
    block sums); four blocks reduced together, the last n_b % 4 one by one."""
    sig = types.none(packed, w0, q, q0, q_stride, n_b, sums)

    def codegen(context, builder, signature, args):
        wbase, qbases, nb_v = dot_pointers(context, builder, signature, args, 1)
        sbase = _data_ptr(context, builder, signature.args[6], args[6], _c64(0))  # i32*
        block = _block_builder(builder, 1, wbase, qbases)
        n_groups = builder.sdiv(nb_v, _c64(4))  # four blocks at a time: sums[4g .. 4g+3]
        loop = _open_loop(builder, "grp", builder.icmp_signed(">", n_groups, _c64(0)))
        g = builder.phi(_I64)
        first = builder.mul(g, _c64(4))
        sums4 = _reduce4(builder, [block(builder.add(first, _c64(u)))[0] for u in range(4)])
        builder.store(sums4, builder.bitcast(builder.gep(sbase, [first]), _V4I32.as_pointer()), align=4)
        _close_loop(builder, loop, g, _c64(0), n_groups, [], [], [])
        tail_start = builder.mul(n_groups, _c64(4))
        loop = _open_loop(builder, "tail", builder.icmp_signed("<", tail_start, nb_v))
        b = builder.phi(_I64)
        builder.store(_reduce_add(builder, block(b)[0]), builder.gep(sbase, [b]))
        _close_loop(builder, loop, b, tail_start, nb_v, [], [], [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def i2s_block_scaled_dots4(typingctx, packed, w0, q, q0, q_stride, n_b, q_sums, d_x, scales, s0):
    """Four tokens' block-scaled dots of one row, upstream's float order (kernels.q8k), as a tuple of float32:
    acc_t = sum over blocks b, in order, of float32(dot_tb - q_sums[4b + t]) * float32(d_x[4b + t] * scales[s0 + b])
    (q_sums i32, d_x f32: the tile's block sums and Q8_K scales, block-major; scales f32: the weight's block scales,
    this row's from s0). Each lane does the scalar loop's float32 operations (no fused multiply-add)."""
    sig = types.UniTuple(types.float32, 4)(packed, w0, q, q0, q_stride, n_b, q_sums, d_x, scales, s0)

    def codegen(context, builder, signature, args):
        wbase, qbases, nb_v = dot_pointers(context, builder, signature, args, 4)
        qs_ty, dx_ty, sc_ty, s0_ty = signature.args[6:]
        qs_base = _data_ptr(context, builder, qs_ty, args[6], _c64(0))
        dx_base = _data_ptr(context, builder, dx_ty, args[7], _c64(0))
        (s0_v,) = _as_i64(context, builder, (args[9],), (s0_ty,))
        sc_base = _data_ptr(context, builder, sc_ty, args[8], s0_v)
        v4f32 = ir.VectorType(ir.FloatType(), 4)
        block = _block_builder(builder, 4, wbase, qbases)
        zero = ir.Constant(v4f32, None)
        loop = _open_loop(builder, "sblk4", builder.icmp_signed(">", nb_v, _c64(0)))
        b = builder.phi(_I64)
        acc = builder.phi(v4f32)
        at = builder.mul(b, _c64(4))
        qs = builder.load(builder.bitcast(builder.gep(qs_base, [at]), _V4I32.as_pointer()), align=4)
        dx = builder.load(builder.bitcast(builder.gep(dx_base, [at]), v4f32.as_pointer()), align=4)
        s = builder.load(builder.gep(sc_base, [b]))
        s4 = builder.insert_element(ir.Constant(v4f32, ir.Undefined), s, ir.Constant(_I32, 0))
        s4 = builder.shuffle_vector(s4, s4, ir.Constant(_V4I32, [ir.Constant(_I32, 0)] * 4))
        term = builder.fmul(builder.sitofp(builder.sub(_reduce4(builder, block(b)), qs), v4f32), builder.fmul(dx, s4))
        (final,) = _close_loop(builder, loop, b, _c64(0), nb_v, [acc], [zero], [builder.fadd(acc, term)])
        lanes = [builder.extract_element(final, ir.Constant(_I32, t)) for t in range(4)]
        return context.make_tuple(builder, signature.return_type, lanes)

    return sig, codegen
