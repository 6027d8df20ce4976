"""512-bit form of the screened head's dot, for hosts with AVX-512 BW + VNNI (`kernels.simd.HAVE_AVX512`: Intel
Sapphire Rapids and later, AMD Genoa).

`i8_i16_dot{1,2,4}(w, w0, x, x0, x_stride, n_chunks)`: the contract and the integers of
`kernels.simd_dense.i8_i16_dot{1,2,4}` (exact int32 dots of int8 weights with int16 activation rows): 32 weights
sign-extended to int16 (`vpmovsxbw` zmm) meet 32 activations in one `vpdpwssd` (multiply pairs, add both to the
accumulator: no separate widening add), four 32-weight chunks (two 64-byte lines) per loop trip into 4 / n_rows
accumulators per row (vpdpwssd's latency), the n_chunks % 4 last ones into the first. Three vector instructions
per 32 weights instead of ten. On a 2-vCPU Intel Xeon (AVX-512; one process, medians), the 2B-4T screen over
0.33 GB took 14.6-14.7 ms against 18.7-19.6 ms for the 256-bit form (in cache: 45 against 35 GB/s).

Measured and not kept (same host, same method): 512-bit I2_S ternary dots (`vpdpbusd` zmm, two blocks per
register, activations of the two blocks joined from two 32-byte loads) ran 0.85-1.0x the 256-bit VNNI dots for
1, 4 and 128 tokens: zmm `vpdpbusd` issues on one port where the ymm form has two, so the wider form does not
shorten the ternary dot's critical resource; a 512-bit float16 head dot (the same bits) measured the same as the
256-bit one from memory and from cache.
Integer lanes cannot overflow: each lane sums a subset of the 256-bit form's products.
"""
from llvmlite import ir
from numba.extending import intrinsic

from .simd import (_I16, _I32, _V32I8, _close_loop, _get_or_insert, _open_loop, _prefetch_stream,
                   _return_row_totals, dot_pointers, dot_signature)

_I64 = ir.IntType(64)
_V16I32 = ir.VectorType(_I32, 16)
_V32I16 = ir.VectorType(_I16, 32)


def _c64(v):
    return ir.Constant(_I64, v)


def _load(builder, base, offset, vty, align=1):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vty.as_pointer()), align=align)


def _make_i8_i16_dot(n_rows):
    n_acc = 4 if n_rows <= 2 else 2

    @intrinsic
    def i8_i16_dot(typingctx, w, w0, x, x0, x_stride, n_chunks):
        sig = dot_signature(n_rows, w, w0, x, x0, x_stride, n_chunks)

        def codegen(context, builder, signature, args):
            wbase, xbases, n_v = dot_pointers(context, builder, signature, args, n_rows)  # i8 / i16 elements
            dpwssd = _get_or_insert(builder.module, "llvm.x86.avx512.vpdpwssd.512",
                                    ir.FunctionType(_V16I32, [_V16I32] * 3))

            def chunk(c, accs, slot):
                off = builder.mul(c, _c64(32))
                w16 = builder.bitcast(builder.sext(_load(builder, wbase, off, _V32I8), _V32I16), _V16I32)
                for t in range(n_rows):
                    xv = builder.bitcast(_load(builder, xbases[t], off, _V32I16, 2), _V16I32)
                    accs[t * n_acc + slot] = builder.call(dpwssd, [accs[t * n_acc + slot], w16, xv])

            zeros = [ir.Constant(_V16I32, None)] * (n_rows * n_acc)
            n_trips = builder.sdiv(n_v, _c64(4))
            blocks = _open_loop(builder, "i16s512", builder.icmp_signed(">", n_trips, _c64(0)))
            i = builder.phi(_I64)
            accs = [builder.phi(_V16I32) for _ in zeros]
            first = builder.mul(i, _c64(4))
            byte0 = builder.mul(first, _c64(32))
            _prefetch_stream(builder, wbase, byte0)
            _prefetch_stream(builder, wbase, builder.add(byte0, _c64(64)))
            new = list(accs)
            for c in range(4):
                chunk(builder.add(first, _c64(c)), new, c % n_acc)
            wide = _close_loop(builder, blocks, i, _c64(0), n_trips, accs, zeros, new)
            rest_start = builder.mul(n_trips, _c64(4))
            rest = _open_loop(builder, "i16s512_tail", builder.icmp_signed("<", rest_start, n_v))
            c = builder.phi(_I64)
            raccs = [builder.phi(_V16I32) for _ in zeros]
            rnew = list(raccs)
            chunk(c, rnew, 0)
            final = _close_loop(builder, rest, c, rest_start, n_v, raccs, wide, rnew)
            return _return_row_totals(context, builder, signature, final, n_acc, n_rows)

        return sig, codegen

    return i8_i16_dot


i8_i16_dot1 = _make_i8_i16_dot(1)
i8_i16_dot2 = _make_i8_i16_dot(2)
i8_i16_dot4 = _make_i8_i16_dot(4)
