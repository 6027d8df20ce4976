"""Attention building blocks as LLVM IR intrinsics (float16 K/V cache, GQA groups of four query heads).

Written by hand because the loops Numba hands to LLVM leave most of the time outside the arithmetic: a q.k dot
of 128 dims is 16 vector FMAs per accumulator, and LLVM then reduces each of the eight accumulators on its own
(seven shuffles and adds each); p.v keeps its sixteen output vectors in memory and reloads them for every key.

- `qk4x2(q, t, h0, k16, kvh, s0, s1)`: the eight float32 dots q[t, h0 + g] . K[kvh, s] for g < 4 and the keys
  at slots s0, s1, as a tuple (g0 s0, .., g3 s0, g0 s1, .., g3 s1). Each dot sums in the order of a vectorized
  float32 loop: 8 lanes (lane l holds dims l, l+8, ...; one FMA per 8 dims), then lanes (l + l+4), then
  (0+2, 1+3), then 0+1; the eight reductions share their shuffles (transposed) instead of running one by one.
- `qk1x32(q, t, h, row, n_chunks)`: q[t, h, :32n] . row[:32n] for one head (GQA groups other than four), in the
  order LLVM gives a reassociated float32 loop on AVX2 hosts: four 8-lane accumulators (one FMA per 8 dims),
  (a0 + a1) + (a2 + a3), then lanes (l + l+4), then (0+2, 1+3), then 0+1. Written out so that AVX-512 hosts
  (where LLVM picks 16 lanes on Genoa) sum in the same order: the same bits on every host.
- `pv4x16(sc, slots, j0, j1, v16, kvh, d, acc, c)`: acc[g, c + i] = fma(sc[g, j], V[kvh, slots[j], d + i],
  acc[g, c + i]) for g < 4, i < 16 and keys j0 <= j < j1 in key order (one fused multiply-add per key and
  element: one rounding, as a sequential loop over keys per output element compiled with FMA). The sixteen
  sums stay in registers for the whole key range. `pv4x32`: the same for i < 32 in zmm registers (hosts with
  AVX-512): the same operations per element, half the instructions. p.v is bound by its floating-point
  operations when its rows are in cache (in L1: 21.8 ns per key and KV head for 128 dims with pv4x16, 13.6 with
  pv4x32, one thread, when each product was rounded before its add; the fused form does half the operations:
  30 layers at 4096 keys from L3, 2 threads, 12.2 -> 9.3-10.4 ms).
- `prefetch_row(c16, slot, kvh, d0, n_bytes)`: software prefetch of n_bytes of c16[kvh, slot, d0:]. q.k
  prefetches the K rows QK_PREFETCH_KEYS keys ahead and p.v the next block's V rows (kernels.attention_fast).
  Measured when one KV head's rows sat 1280 bytes apart (the cache was [slot, KV head, dim]): 30 layers of one
  decode step, 2 threads, caches in memory, one process: the fast kernel at 1000 / 2000 / 4000 keys 11.9 / 28.0 /
  58.1 -> 10.0 / 21.7 / 48.5 ms (scripts/bench_attention.py --layer-caches --against). With each head's rows
  contiguous ([KV head, slot, dim]) the prefetches still pay: without them the split kernel took 50.9 against
  35.7 ms at 4096 keys; 16 keys ahead instead of 8 was no faster. In token tiles only the tile's first token
  prefetches (a 128-token prefill at 4096 keys: within the noise).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import _I32, _as_i64, _close_loop, _get_or_insert, _open_loop, _prefetch, _reduce_add

_F32 = ir.FloatType()
_V8F32 = ir.VectorType(_F32, 8)
_V4F32 = ir.VectorType(_F32, 4)
_I64 = ir.IntType(64)


def _c64(v):
    return ir.Constant(_I64, v)


def _shuffle(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(lanes)), lanes))


def _ptr(context, builder, arrty, arr, inds):
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, arrty, ary, inds, wraparound=False)


def _load_f16(builder, ptr, lanes=8):
    """`lanes` float16 (u16 bits) at ptr -> <lanes x float> (exact)."""
    bits = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(16), lanes).as_pointer()), align=2)
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(_F32, lanes))


def _reduce8_transposed(builder, accs):
    """Eight <8 x float> accumulators -> their eight lane sums, each as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))
    (LLVM's own reduction order for one vector), computed for all eight at once."""
    halves = []
    for a, b in ((0, 1), (2, 3), (4, 5), (6, 7)):  # [lo(a), lo(b)] + [hi(a), hi(b)]: lanes l + (l + 4)
        lo = _shuffle(builder, accs[a], accs[b], [0, 1, 2, 3, 8, 9, 10, 11])
        hi = _shuffle(builder, accs[a], accs[b], [4, 5, 6, 7, 12, 13, 14, 15])
        halves.append(builder.fadd(lo, hi))
    pairs = []
    for x, y in ((0, 1), (2, 3)):  # per accumulator: (0+2, 1+3)
        even = _shuffle(builder, halves[x], halves[y], [0, 1, 8, 9, 4, 5, 12, 13])
        odd = _shuffle(builder, halves[x], halves[y], [2, 3, 10, 11, 6, 7, 14, 15])
        pairs.append(builder.fadd(even, odd))
    # pairs[0] = [a0 y0 y1, a2 y0 y1 | a1 y0 y1, a3 y0 y1]; pairs[1] likewise for accumulators 4..7
    first = _shuffle(builder, pairs[0], pairs[1], [0, 2, 8, 10, 4, 6, 12, 14])
    second = _shuffle(builder, pairs[0], pairs[1], [1, 3, 9, 11, 5, 7, 13, 15])
    total = builder.fadd(first, second)  # [a0, a2, a4, a6, a1, a3, a5, a7]
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    return [builder.extract_element(total, ir.Constant(_I32, order[i])) for i in range(8)]


@intrinsic
def qk4x2(typingctx, q, t, h0, k16, kvh, s0, s1):
    sig = types.UniTuple(types.float32, 8)(q, t, h0, k16, kvh, s0, s1)

    def codegen(context, builder, signature, args):
        q_v, t_v, h0_v, k_v, kvh_v, s0_v, s1_v = args
        qty, tty, hty, kty, kvty, s0ty, s1ty = signature.args
        t_v, h0_v, kvh_v, s0_v, s1_v = _as_i64(context, builder, (t_v, h0_v, kvh_v, s0_v, s1_v),
                                               (tty, hty, kvty, s0ty, s1ty))
        qarr = context.make_array(qty)(context, builder, q_v)
        D = builder.extract_value(qarr.shape, 2)
        qrows = [_ptr(context, builder, qty, q_v, [t_v, builder.add(h0_v, _c64(g)), _c64(0)]) for g in range(4)]
        krows = [_ptr(context, builder, kty, k_v, [kvh_v, s, _c64(0)]) for s in (s0_v, s1_v)]
        n_chunks = builder.sdiv(D, _c64(8))
        zero = ir.Constant(_V8F32, None)
        blocks = _open_loop(builder, "qk", builder.icmp_signed(">", n_chunks, _c64(0)))
        i = builder.phi(_I64)
        accs = [builder.phi(_V8F32) for _ in range(8)]
        off = builder.mul(i, _c64(8))
        ks = [_load_f16(builder, builder.gep(kr, [off])) for kr in krows]
        qs = [builder.load(builder.bitcast(builder.gep(qr, [off]), _V8F32.as_pointer()), align=4) for qr in qrows]
        new = []
        for key in range(2):
            for g in range(4):
                prod = builder.fmul(qs[g], ks[key], flags=["contract"])
                new.append(builder.fadd(accs[key * 4 + g], prod, flags=["contract"]))
        finals = _close_loop(builder, blocks, i, _c64(0), n_chunks, accs, [zero] * 8, new)
        sums = _reduce8_transposed(builder, finals)
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


def _make_pv4(lanes):
    """p.v over 2 * lanes dims for 4 heads: two vectors of `lanes` float32 per head (8: ymm, 16: zmm)."""
    vf32 = ir.VectorType(_F32, lanes)

    @intrinsic
    def pv4(typingctx, sc, slots, j0, j1, v16, kvh, d, acc, c):
        sig = types.void(sc, slots, j0, j1, v16, kvh, d, acc, c)

        def codegen(context, builder, signature, args):
            sc_v, sl_v, j0_v, j1_v, v_v, kvh_v, d_v, acc_v, c_v = args
            scty, slty, j0ty, j1ty, vty, kvty, dty, accty, cty = signature.args
            j0_v, j1_v, kvh_v, d_v, c_v = _as_i64(context, builder, (j0_v, j1_v, kvh_v, d_v, c_v),
                                                  (j0ty, j1ty, kvty, dty, cty))
            acc_ptrs = []
            for g in range(4):
                row = _ptr(context, builder, accty, acc_v, [_c64(g), c_v])
                acc_ptrs += [builder.bitcast(row, vf32.as_pointer()),
                             builder.bitcast(builder.gep(row, [_c64(lanes)]), vf32.as_pointer())]
            start = [builder.load(p, align=4) for p in acc_ptrs]
            fma = _get_or_insert(builder.module, f"llvm.fma.v{lanes}f32", ir.FunctionType(vf32, [vf32] * 3))
            blocks = _open_loop(builder, "pv", builder.icmp_signed("<", j0_v, j1_v))
            j = builder.phi(_I64)
            accs = [builder.phi(vf32) for _ in range(8)]
            slot = builder.load(_ptr(context, builder, slty, sl_v, [j]))
            vrow = _ptr(context, builder, vty, v_v, [kvh_v, slot, d_v])
            vs = [_load_f16(builder, vrow, lanes), _load_f16(builder, builder.gep(vrow, [_c64(lanes)]), lanes)]
            new = []
            for g in range(4):
                p = builder.load(_ptr(context, builder, scty, sc_v, [_c64(g), j]))
                pv = builder.insert_element(ir.Constant(vf32, None), p, ir.Constant(_I32, 0))
                pv = _shuffle(builder, pv, pv, [0] * lanes)
                for h in range(2):  # one rounding per key: acc = fma(p, v, acc)
                    new.append(builder.call(fma, [pv, vs[h], accs[2 * g + h]]))
            finals = _close_loop(builder, blocks, j, j0_v, j1_v, accs, start, new)
            for final, p in zip(finals, acc_ptrs):
                builder.store(final, p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return pv4


pv4x16 = _make_pv4(8)
pv4x32 = _make_pv4(16)  # zmm: hosts with AVX-512 only (kernels.simd.HAVE_AVX512)


@intrinsic
def qk1x32(typingctx, q, t, h, row, n_chunks):
    sig = types.float32(q, t, h, row, n_chunks)

    def codegen(context, builder, signature, args):
        q_v, t_v, h_v, row_v, n_v = args
        qty, tty, hty, rty, nty = signature.args
        t_v, h_v, n_v = _as_i64(context, builder, (t_v, h_v, n_v), (tty, hty, nty))
        qrow = _ptr(context, builder, qty, q_v, [t_v, h_v, _c64(0)])
        krow = _ptr(context, builder, rty, row_v, [_c64(0)])
        zero = ir.Constant(_V8F32, None)
        blocks = _open_loop(builder, "qk1", builder.icmp_signed(">", n_v, _c64(0)))
        i = builder.phi(_I64)
        accs = [builder.phi(_V8F32) for _ in range(4)]
        fma = _get_or_insert(builder.module, "llvm.fma.v8f32", ir.FunctionType(_V8F32, [_V8F32] * 3))  # one rounding
        new = []
        for part in range(4):
            off = builder.add(builder.mul(i, _c64(32)), _c64(8 * part))
            qs = builder.load(builder.bitcast(builder.gep(qrow, [off]), _V8F32.as_pointer()), align=4)
            ks = builder.load(builder.bitcast(builder.gep(krow, [off]), _V8F32.as_pointer()), align=4)
            new.append(builder.call(fma, [qs, ks, accs[part]]))
        a = _close_loop(builder, blocks, i, _c64(0), n_v, accs, [zero] * 4, new)
        return _reduce_add(builder, builder.fadd(builder.fadd(a[0], a[1]), builder.fadd(a[2], a[3])))

    return sig, codegen


@intrinsic
def prefetch_row(typingctx, c16, slot, kvh, d0, n_bytes):
    """Prefetch the cache lines holding n_bytes of c16[kvh, slot, d0:] (see the module docstring)."""
    sig = types.void(c16, slot, kvh, d0, n_bytes)

    def codegen(context, builder, signature, args):
        c_v, slot_v, kvh_v, d0_v, nb_v = args
        cty, sty, kty, dty, nty = signature.args
        slot_v, kvh_v, d0_v, nb_v = _as_i64(context, builder, (slot_v, kvh_v, d0_v, nb_v), (sty, kty, dty, nty))
        base = builder.bitcast(_ptr(context, builder, cty, c_v, [kvh_v, slot_v, d0_v]), ir.IntType(8).as_pointer())
        n_lines = builder.sdiv(builder.add(nb_v, _c64(63)), _c64(64))
        blocks = _open_loop(builder, "pf", builder.icmp_signed(">", n_lines, _c64(0)))
        line = builder.phi(_I64)
        _prefetch(builder, builder.gep(base, [builder.mul(line, _c64(64))]), 3)  # needed a few keys later: L1
        _close_loop(builder, blocks, line, _c64(0), n_lines, [], [], [])
        return context.get_dummy_value()

    return sig, codegen
