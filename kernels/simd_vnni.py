"""I2_S ternary dots with `vpdpbusd` (AVX-512 VNNI with 256-bit forms, or AVX-VNNI), for hosts that have it
(`kernels.simd.HAVE_VNNI`: AMD Genoa, Intel Sapphire Rapids and later). Same contract and same integers as
`kernels.simd.i2s_dot{1,2,4}`; kernels.ternary_matmul picks these where available.

`vpdpbusd acc, codes, q` multiplies 32 u8 codes by 32 i8 activations, sums each group of four products and adds
them to the eight i32 lanes of acc: one instruction for what takes vpmaddubsw, an i16 add and (every few blocks)
vpmaddwd + an i32 add otherwise. Its latency is ~5 cycles, so one accumulator per row would chain every product
of the row; each row here has 8 / n_rows independent accumulators (code slice j of block u of each two-block
step goes to accumulator (4u + j) mod that), added together at the end (integer adds: the order is free).
i32 lanes cannot overflow: |sum| <= K * 2 * 128 for any K this engine meets.
"""
from llvmlite import ir
from numba.extending import intrinsic

from .simd import (_I8, _V8I32, _V32I8, _close_loop, _get_or_insert, _prefetch_stream, _return_row_totals, _splat,
                   dot_pointers, dot_signature)

_I64 = ir.IntType(64)


def _c64(v):
    return ir.Constant(_I64, v)


def _make_i2s_dot_vnni(n_rows):
    n_acc = 8 // n_rows  # independent accumulators per row

    @intrinsic
    def i2s_dot(typingctx, packed, w0, q, q0, q_stride, n_blocks):
        sig = dot_signature(n_rows, packed, w0, q, q0, q_stride, n_blocks)

        def codegen(context, builder, signature, args):
            wbase, qbases, nb_v = dot_pointers(context, builder, signature, args, n_rows)
            dpbusd = _get_or_insert(builder.module, "llvm.x86.avx512.vpdpbusd.256",
                                    ir.FunctionType(_V8I32, [_V8I32, _V8I32, _V8I32]))
            three = _splat(_I8, 3, 32)
            zeros = [ir.Constant(_V8I32, None)] * (n_rows * n_acc)

            def block(blk, accs, u):
                """Block blk's products added to the accumulators (flat list, row-major) -> new list."""
                accs = list(accs)
                woff = builder.mul(blk, _c64(32))
                wb = builder.load(builder.bitcast(builder.gep(wbase, [woff]), _V32I8.as_pointer()), align=1)
                codes = [builder.bitcast(builder.and_(builder.lshr(wb, _splat(_I8, s, 32)), three) if s
                                         else builder.and_(wb, three), _V8I32) for s in (6, 4, 2, 0)]
                for t in range(n_rows):
                    qb = builder.gep(qbases[t], [builder.mul(blk, _c64(128))])
                    for j in range(4):
                        qp = builder.bitcast(builder.gep(qb, [_c64(32 * j)]), _V8I32.as_pointer())
                        a = t * n_acc + (4 * u + j) % n_acc
                        accs[a] = builder.call(dpbusd, [accs[a], codes[j], builder.load(qp, align=1)])
                return accs

            def merge(incoming):
                out = []
                for i in range(n_rows * n_acc):
                    p = builder.phi(_V8I32)
                    for values, blk in incoming:
                        p.add_incoming(values[i], blk)
                    out.append(p)
                return out

            # pairs of blocks (one 64-byte line of weights, prefetched ahead), then an odd last block
            n_pairs = builder.sdiv(nb_v, _c64(2))
            entry = builder.block
            loop = builder.append_basic_block("vnni_loop")
            after = builder.append_basic_block("vnni_after")
            odd = builder.append_basic_block("vnni_odd")
            done = builder.append_basic_block("vnni_done")
            builder.cbranch(builder.icmp_signed(">", n_pairs, _c64(0)), loop, after)
            builder.position_at_end(loop)
            i = builder.phi(_I64)
            accs = [builder.phi(_V8I32) for _ in range(n_rows * n_acc)]
            first = builder.mul(i, _c64(2))
            _prefetch_stream(builder, wbase, builder.mul(first, _c64(32)))
            new = block(builder.add(first, _c64(1)), block(first, accs, 0), 1)
            paired = _close_loop(builder, (entry, loop, after), i, _c64(0), n_pairs, accs, zeros, new)
            builder.cbranch(builder.icmp_signed(">", nb_v, builder.mul(n_pairs, _c64(2))), odd, done)
            builder.position_at_end(odd)
            last = block(builder.sub(nb_v, _c64(1)), paired, 0)
            builder.branch(done)
            builder.position_at_end(done)
            final = merge([(paired, after), (last, odd)])
            return _return_row_totals(context, builder, signature, final, n_acc, n_rows)

        return sig, codegen

    return i2s_dot


i2s_dot1 = _make_i2s_dot_vnni(1)
i2s_dot2 = _make_i2s_dot_vnni(2)
i2s_dot4 = _make_i2s_dot_vnni(4)
