"""Vector building blocks for Numba kernels, emitted as LLVM IR through `numba.extending.intrinsic`.

Numba's auto-vectorizer does not find the byte-multiply instructions that make ternary dot products fast
(x86 `vpmaddubsw`: 32 u8 x i8 products summed in pairs to i16, then `vpmaddwd` against ones to i32), nor
float16 -> float32 conversion (Numba has no float16 type on the CPU). These intrinsics inline into the
calling `@njit` function; everything around them stays ordinary Numba code.

- `HAVE_AVX2`: whether the host can run the `i2s_dot*` intrinsics (callers fall back to plain loops if not).
- `i2s_dot{1,2,4}(packed, w0, q, q0, q_stride, n_blocks)`: exact int32 dot products of the ternary codes of
  `n_blocks` I2_S blocks (32 bytes = 128 codes each, starting at byte `w0` of `packed`) with 1/2/4 int8
  activation rows (`q` flat i8, row t at `q0 + t*q_stride`), as sum(code * q) with code in {0, 1, 2}; the
  caller subtracts sum(q). Returns an int32 (dot1) or a tuple of int32.
- `i8_dot(a, a0, b, b0, n_chunks)`: exact int32 dot of 32*n_chunks int8 values of flat arrays a (from a0)
  and b (from b0): sign-extended to i16, `vpmaddwd`, i32 lanes (|sum| < 2^31 for n_chunks < 2^16).
- `f16_to_f32(bits)`: u16 float16 bits -> float32 value (exact; `fpext half`, vectorizes to vcvtph2ps).

Overflow: per 128-value block and row, |partial| <= 128 * 2 * 128 = 32768 fits the i32 lanes; i16 lanes
hold at most 4 pair sums of |2 * 128| * 2 = 2048.
"""
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_FEATURES = set()
try:
    _FEATURES = {f[1:] for f in llvm_binding.get_host_cpu_features().flatten().split(",") if f.startswith("+")}
except Exception:  # pragma: no cover - exotic hosts
    pass
HAVE_AVX2 = "avx2" in _FEATURES
HAVE_F16C = "f16c" in _FEATURES or "neon" in _FEATURES or "fp-armv8" in _FEATURES

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_V32I8 = ir.VectorType(_I8, 32)
_V16I16 = ir.VectorType(_I16, 16)
_V8I32 = ir.VectorType(_I32, 8)


def _get_or_insert(module, name, fnty):
    try:
        return module.get_global(name)
    except KeyError:
        return ir.Function(module, fnty, name=name)


def _splat(ty, value, n):
    return ir.Constant(ir.VectorType(ty, n), [ir.Constant(ty, value)] * n)


def _data_ptr(context, builder, arrty, arr, offset):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(ary.data, [offset])


def _reduce_add(builder, vec):
    """<8 x i32> -> i32 by halving (portable, no reduction intrinsic needed)."""
    n = vec.type.count
    while n > 1:
        half = n // 2
        lo = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, half), list(range(half, n))))
        vec = builder.add(lo, hi)
        n = half
    return builder.extract_element(vec, ir.Constant(_I32, 0))


def _make_i2s_dot(n_rows):
    @intrinsic
    def i2s_dot(typingctx, packed, w0, q, q0, q_stride, n_blocks):
        ret = types.int32 if n_rows == 1 else types.UniTuple(types.int32, n_rows)
        sig = ret(packed, w0, q, q0, q_stride, n_blocks)

        def codegen(context, builder, signature, args):
            packed_v, w0_v, q_v, q0_v, stride_v, nb_v = args
            pty, wty, qty, q0ty, sty, nbty = signature.args
            i64 = ir.IntType(64)
            w0_v = context.cast(builder, w0_v, wty, types.int64)
            q0_v = context.cast(builder, q0_v, q0ty, types.int64)
            stride_v = context.cast(builder, stride_v, sty, types.int64)
            nb_v = context.cast(builder, nb_v, nbty, types.int64)
            module = builder.module
            maddubs = _get_or_insert(module, "llvm.x86.avx2.pmadd.ub.sw",
                                     ir.FunctionType(_V16I16, [_V32I8, _V32I8]))
            maddwd = _get_or_insert(module, "llvm.x86.avx2.pmadd.wd", ir.FunctionType(_V8I32, [_V16I16, _V16I16]))
            wbase = _data_ptr(context, builder, pty, packed_v, w0_v)
            qbases = [_data_ptr(context, builder, qty, q_v,
                                builder.add(q0_v, builder.mul(stride_v, ir.Constant(i64, t))))
                      for t in range(n_rows)]
            ones16 = _splat(_I16, 1, 16)
            three = _splat(_I8, 3, 32)
            zero = ir.Constant(_V8I32, None)
            entry = builder.block
            loop = builder.append_basic_block("i2s_loop")
            done = builder.append_basic_block("i2s_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            accs = [builder.phi(_V8I32) for _ in range(n_rows)]
            wp = builder.bitcast(builder.gep(wbase, [builder.mul(i, ir.Constant(i64, 32))]), _V32I8.as_pointer())
            wb = builder.load(wp, align=1)
            codes = [builder.and_(builder.lshr(wb, _splat(_I8, s, 32)), three) if s else builder.and_(wb, three)
                     for s in (6, 4, 2, 0)]
            new_accs = []
            for t in range(n_rows):
                qb = builder.gep(qbases[t], [builder.mul(i, ir.Constant(i64, 128))])
                s16 = None
                for j in range(4):
                    qp = builder.bitcast(builder.gep(qb, [ir.Constant(i64, 32 * j)]), _V32I8.as_pointer())
                    prod = builder.call(maddubs, [codes[j], builder.load(qp, align=1)])
                    s16 = prod if s16 is None else builder.add(s16, prod)
                new_accs.append(builder.add(accs[t], builder.call(maddwd, [s16, ones16])))
            i_next = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(ir.Constant(i64, 0), entry)
            i.add_incoming(i_next, loop)
            for a, na in zip(accs, new_accs):
                a.add_incoming(zero, entry)
                a.add_incoming(na, loop)
            builder.cbranch(builder.icmp_signed("<", i_next, nb_v), loop, done)
            builder.position_at_end(done)
            sums = [_reduce_add(builder, na) for na in new_accs]
            if n_rows == 1:
                return sums[0]
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return i2s_dot


i2s_dot1 = _make_i2s_dot(1)
i2s_dot2 = _make_i2s_dot(2)
i2s_dot4 = _make_i2s_dot(4)


@intrinsic
def i8_dot(typingctx, a, a0, b, b0, n_chunks):
    sig = types.int32(a, a0, b, b0, n_chunks)

    def codegen(context, builder, signature, args):
        a_v, a0_v, b_v, b0_v, n_v = args
        aty, a0ty, bty, b0ty, nty = signature.args
        i64 = ir.IntType(64)
        a0_v = context.cast(builder, a0_v, a0ty, types.int64)
        b0_v = context.cast(builder, b0_v, b0ty, types.int64)
        n_v = context.cast(builder, n_v, nty, types.int64)
        maddwd = _get_or_insert(builder.module, "llvm.x86.avx2.pmadd.wd",
                                ir.FunctionType(_V8I32, [_V16I16, _V16I16]))
        abase = _data_ptr(context, builder, aty, a_v, a0_v)
        bbase = _data_ptr(context, builder, bty, b_v, b0_v)
        v16i8 = ir.VectorType(_I8, 16)
        entry = builder.block
        loop = builder.append_basic_block("i8_loop")
        done = builder.append_basic_block("i8_done")
        builder.branch(loop)
        builder.position_at_end(loop)
        i = builder.phi(i64)
        accs = [builder.phi(_V8I32) for _ in range(2)]
        new_accs = []
        for h in range(2):
            off = builder.add(builder.mul(i, ir.Constant(i64, 32)), ir.Constant(i64, 16 * h))
            va = builder.load(builder.bitcast(builder.gep(abase, [off]), v16i8.as_pointer()), align=1)
            vb = builder.load(builder.bitcast(builder.gep(bbase, [off]), v16i8.as_pointer()), align=1)
            prod = builder.call(maddwd, [builder.sext(va, _V16I16), builder.sext(vb, _V16I16)])
            new_accs.append(builder.add(accs[h], prod))
        i_next = builder.add(i, ir.Constant(i64, 1))
        i.add_incoming(ir.Constant(i64, 0), entry)
        i.add_incoming(i_next, loop)
        for acc, na in zip(accs, new_accs):
            acc.add_incoming(ir.Constant(_V8I32, None), entry)
            acc.add_incoming(na, loop)
        builder.cbranch(builder.icmp_signed("<", i_next, n_v), loop, done)
        builder.position_at_end(done)
        return _reduce_add(builder, builder.add(new_accs[0], new_accs[1]))

    return sig, codegen


@intrinsic
def f16_to_f32(typingctx, bits):
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        h = builder.bitcast(builder.trunc(args[0], _I16) if args[0].type != _I16 else args[0], ir.HalfType())
        return builder.fpext(h, ir.FloatType())

    return sig, codegen
