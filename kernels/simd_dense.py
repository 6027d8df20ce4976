"""Head (dense weight) dot products as LLVM IR intrinsics, built from the helpers of `kernels.simd`.

- `i8_dot_abs{1,2}(w, w0, x, xabs, x0, x_stride, n_chunks)`: exact int32 dots of 32*n_chunks int8 weights
  (flat `w` from `w0`) with 1/2 int8 rows of flat `x` (row t at `x0 + t*x_stride`; `xabs` = |x| as u8 at the
  same offsets), for the int8 head: `vpsignb` moves the sign of x onto w, `vpmaddubsw` multiplies by |x| (pair
  sums <= 2 * 128 * 127 never saturate), `vpmaddwd` widens; weights loaded once for both rows and prefetched.
- `i8_i16_dot{1,2,4}(w, w0, x, x0, x_stride, n_chunks)`: the same dots with int16 rows of `x` (the screened head's
  activations): weights sign-extended to int16 (`vpmovsxbw`), `vpmaddwd`; exact while |sum| < 2^31 (callers keep
  127 * max|x| * K below that).
- `f16_dot{1,2}(w, w0, x, x0, x_stride, n_lines)`: float32 dot products of 32*n_lines float16 weights (u16
  bits, flat `w` from `w0`) with 1/2 float32 rows of flat `x` (row t at `x0 + t*x_stride`); each weight line is
  converted once for both rows. Four 8-lane accumulators per row (lane j of vector k sums elements 32i+8k+j),
  then summed (0+1)+(2+3) and halved 8->4->2->1: the same operations for every row count, so a row's result does
  not depend on how many rows share the call. Multiply-add contracts to FMA where the host has it.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .simd import (_I8, _I16, _V8I32, _V16I16, _V32I8, _as_i64, _close_loop, _data_ptr,
                   _get_or_insert, _open_loop, _prefetch_stream, _reduce_add, _return_rows, _splat, dot_pointers,
                   dot_signature)

_ALWAYS = ir.Constant(ir.IntType(1), 1)  # callers pass n >= 1: the loops below run at least once


def _make_i8_dot_abs(n_rows):
    @intrinsic
    def i8_dot_abs(typingctx, w, w0, x, xabs, x0, x_stride, n_chunks):
        ret = types.int32 if n_rows == 1 else types.UniTuple(types.int32, n_rows)
        sig = ret(w, w0, x, xabs, x0, x_stride, n_chunks)

        def codegen(context, builder, signature, args):
            w_v, w0_v, x_v, xa_v, x0_v, stride_v, n_v = args
            wty, w0ty, xty, xaty, x0ty, sty, nty = signature.args
            i64 = ir.IntType(64)
            w0_v, x0_v, stride_v, n_v = _as_i64(context, builder, (w0_v, x0_v, stride_v, n_v),
                                                (w0ty, x0ty, sty, nty))
            module = builder.module
            maddubs = _get_or_insert(module, "llvm.x86.avx2.pmadd.ub.sw",
                                     ir.FunctionType(_V16I16, [_V32I8, _V32I8]))
            maddwd = _get_or_insert(module, "llvm.x86.avx2.pmadd.wd", ir.FunctionType(_V8I32, [_V16I16, _V16I16]))
            psign = _get_or_insert(module, "llvm.x86.avx2.psign.b", ir.FunctionType(_V32I8, [_V32I8, _V32I8]))
            wbase = _data_ptr(context, builder, wty, w_v, w0_v)
            offs = [builder.add(x0_v, builder.mul(stride_v, ir.Constant(i64, t))) for t in range(n_rows)]
            xbases = [_data_ptr(context, builder, xty, x_v, o) for o in offs]
            xabases = [_data_ptr(context, builder, xaty, xa_v, o) for o in offs]
            ones16 = _splat(_I16, 1, 16)
            blocks = _open_loop(builder, "i8s", _ALWAYS)
            i = builder.phi(i64)
            accs = [builder.phi(_V8I32) for _ in range(n_rows)]
            off = builder.mul(i, ir.Constant(i64, 32))

            def load(base):
                return builder.load(builder.bitcast(builder.gep(base, [off]), _V32I8.as_pointer()), align=1)

            _prefetch_stream(builder, wbase, off)
            wv = load(wbase)
            new = []
            for t in range(n_rows):
                prod = builder.call(maddubs, [load(xabases[t]), builder.call(psign, [wv, load(xbases[t])])])
                new.append(builder.add(accs[t], builder.call(maddwd, [prod, ones16])))
            finals = _close_loop(builder, blocks, i, ir.Constant(i64, 0), n_v, accs,
                                 [ir.Constant(_V8I32, None)] * n_rows, new)
            return _return_rows(context, builder, signature, [_reduce_add(builder, f) for f in finals], n_rows)

        return sig, codegen

    return i8_dot_abs


i8_dot_abs1 = _make_i8_dot_abs(1)
i8_dot_abs2 = _make_i8_dot_abs(2)


def _make_i8_i16_dot(n_rows):
    @intrinsic
    def i8_i16_dot(typingctx, w, w0, x, x0, x_stride, n_chunks):
        sig = dot_signature(n_rows, w, w0, x, x0, x_stride, n_chunks)

        def codegen(context, builder, signature, args):
            wbase, xbases, n_v = dot_pointers(context, builder, signature, args, n_rows)  # i8 / i16 elements
            i64 = ir.IntType(64)
            v16i8 = ir.VectorType(_I8, 16)
            maddwd = _get_or_insert(builder.module, "llvm.x86.avx2.pmadd.wd",
                                    ir.FunctionType(_V8I32, [_V16I16, _V16I16]))
            blocks = _open_loop(builder, "i16s", _ALWAYS)
            i = builder.phi(i64)
            accs = [builder.phi(_V8I32) for _ in range(n_rows)]
            off = builder.mul(i, ir.Constant(i64, 32))
            wi8 = builder.bitcast(wbase, _I8.as_pointer())
            _prefetch_stream(builder, wi8, off)
            new = list(accs)
            for half in range(2):  # 16 weights at a time, widened to int16
                o = builder.add(off, ir.Constant(i64, 16 * half))
                wp = builder.bitcast(builder.gep(wi8, [o]), v16i8.as_pointer())
                w16 = builder.sext(builder.load(wp, align=1), _V16I16)
                for t in range(n_rows):
                    xp = builder.bitcast(builder.gep(xbases[t], [o]), _V16I16.as_pointer())
                    new[t] = builder.add(new[t], builder.call(maddwd, [w16, builder.load(xp, align=2)]))
            finals = _close_loop(builder, blocks, i, ir.Constant(i64, 0), n_v, accs,
                                 [ir.Constant(_V8I32, None)] * n_rows, new)
            return _return_rows(context, builder, signature, [_reduce_add(builder, f) for f in finals], n_rows)

        return sig, codegen

    return i8_i16_dot


i8_i16_dot1 = _make_i8_i16_dot(1)
i8_i16_dot2 = _make_i8_i16_dot(2)  # the screened head: two or four tokens per weight load
i8_i16_dot4 = _make_i8_i16_dot(4)


def _make_f16_dot(n_rows):
    @intrinsic
    def f16_dot(typingctx, w, w0, x, x0, x_stride, n_lines):
        sig = dot_signature(n_rows, w, w0, x, x0, x_stride, n_lines, types.float32)

        def codegen(context, builder, signature, args):
            wbase, xbases, n_v = dot_pointers(context, builder, signature, args, n_rows)  # u16 / f32 elements
            i64 = ir.IntType(64)
            f32 = ir.FloatType()
            v8f32 = ir.VectorType(f32, 8)
            v8i16 = ir.VectorType(_I16, 8)
            v8f16 = ir.VectorType(ir.HalfType(), 8)

            def c64(v):
                return ir.Constant(i64, v)

            zero = ir.Constant(v8f32, None)
            blocks = _open_loop(builder, "f16", _ALWAYS)
            i = builder.phi(i64)
            accs = [[builder.phi(v8f32) for _ in range(4)] for _ in range(n_rows)]
            base = builder.mul(i, c64(32))  # 32 halves = one 64-byte line
            _prefetch_stream(builder, wbase, builder.mul(base, c64(2)))
            new = [[None] * 4 for _ in range(n_rows)]
            for j in range(4):
                wp = builder.bitcast(builder.gep(wbase, [builder.add(base, c64(8 * j))]), v8i16.as_pointer())
                wf = builder.fpext(builder.bitcast(builder.load(wp, align=2), v8f16), v8f32)
                for t in range(n_rows):
                    xp = builder.bitcast(builder.gep(xbases[t], [builder.add(base, c64(8 * j))]), v8f32.as_pointer())
                    prod = builder.fmul(wf, builder.load(xp, align=4), flags=["contract"])
                    new[t][j] = builder.fadd(accs[t][j], prod, flags=["contract"])
            flat = _close_loop(builder, blocks, i, c64(0), n_v, [a for row in accs for a in row], [zero] * (4 * n_rows),
                               [v for row in new for v in row])
            sums = []
            for t in range(n_rows):
                f = flat[4 * t:4 * t + 4]
                v = builder.fadd(builder.fadd(f[0], f[1]), builder.fadd(f[2], f[3]))
                sums.append(_reduce_add(builder, v))  # the same order for every row count
            return _return_rows(context, builder, signature, sums, n_rows)

        return sig, codegen

    return f16_dot


f16_dot1 = _make_f16_dot(1)
f16_dot2 = _make_f16_dot(2)
