"""Vector building blocks for Numba kernels, emitted as LLVM IR through `numba.extending.intrinsic`.

Numba's auto-vectorizer does not find the byte-multiply instructions that make ternary dot products fast
(x86 `vpmaddubsw`: 32 u8 x i8 products summed in pairs to i16, then `vpmaddwd` against ones to i32), nor
float16 -> float32 conversion (Numba has no float16 type on the CPU). These intrinsics inline into the
calling `@njit` function; everything around them stays ordinary Numba code.

- `HAVE_AVX2`: whether the host can run the `i2s_dot*` intrinsics (callers fall back to plain loops if not).
- `i2s_dot{1,2,4}(packed, w0, q, q0, q_stride, n_blocks)`: exact int32 dot products of the ternary codes of
  `n_blocks` I2_S blocks (32 bytes = 128 codes each, starting at byte `w0` of `packed`) with 1/2/4 int8
  activation rows (`q` flat i8, row t at `q0 + t*q_stride`), as sum(code * q) with code in {0, 1, 2}; the
  caller subtracts sum(q). Returns an int32 (dot1) or a tuple of int32. On VNNI hosts (`HAVE_VNNI`),
  `kernels.simd_vnni` has the same dots through `vpdpbusd` (the same integers).
- `kernels.simd_dense`: the int8 and float16 head dots, built from the helpers here; `kernels.simd_avx512`: the
  screened head's dot in 512-bit form (hosts with AVX-512 BW + VNNI, `HAVE_AVX512`).
- `f16_to_f32(bits)`: u16 float16 bits -> float32 value (exact; `fpext half`, vectorizes to vcvtph2ps).
- `f32_to_f16_bits(x)`: float32 -> nearest float16 as u16 bits (`fptrunc`, vectorizes to vcvtps2ph).
- `i32_as_f32(bits)`: bit cast int32 -> float32 (builds 2^n in `kernels.expf`).

Unpacking, 1 and 2 rows: one 16-bit shift per 32 weight bytes, not one per code. Masks 3 and 12 on the bytes
and on the bytes shifted right by 4 give the codes of values 96+p and 32+p, and four times those of 64+p and p;
the latter go to a second i16 sum whose lanes are multiples of 4, shifted right by 2 (exactly) before
widening. 4 rows keep one shift per code (two sums per row would spill registers).
Overflow: per 128-value block and row, |partial| <= 128 * 2 * 128 = 32768 fits the i32 lanes; an i16 lane
holds the pair sums of BLOCKS_PER_STEP[n_rows] blocks, at most 4 * 2 * (2 * 12 * 128) = 24576 in the four-times
sum of 1-2 rows (2 * 4 * (2 * 3 * 128) = 6144 for 4 rows), even for the code 3 that I2_S never writes
(vpmaddubsw's saturation at 32767 is never reached).
"""
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .config import USE_AVX512, USE_VNNI

_FEATURES = set()
try:
    _FEATURES = {f[1:] for f in llvm_binding.get_host_cpu_features().flatten().split(",") if f.startswith("+")}
except Exception:  # pragma: no cover - exotic hosts
    pass
HAVE_AVX2 = "avx2" in _FEATURES
HAVE_F16C = "f16c" in _FEATURES or "neon" in _FEATURES or "fp-armv8" in _FEATURES
# VNNI (AVX-512 VNNI with 256-bit forms, or AVX-VNNI): `vpdpbusd` multiplies u8 x i8, sums each group of four and
# adds to i32 lanes in one instruction, replacing vpmaddubsw + i16 adds + vpmaddwd (AMD Genoa, Intel Sapphire
# Rapids and later; not the Zen 3 VMs of the first nine sessions). BITNET_PY_VNNI=0 turns it off (kernels/config.py).
HAVE_VNNI = HAVE_AVX2 and USE_VNNI and (("avx512vnni" in _FEATURES and "avx512vl" in _FEATURES)
                                        or "avxvnni" in _FEATURES)
# The screened head's 512-bit dot (kernels.simd_avx512): word ops on zmm (BW) and vpdpwssd (VNNI). Hosts with
# AVX-512 VNNI pass HAVE_VNNI too. BITNET_PY_AVX512=0 turns it off.
HAVE_AVX512 = (HAVE_VNNI and USE_AVX512
               and all(f in _FEATURES for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni")))

# i2s_dot: blocks per loop step by row count (their products are summed in i16 lanes before one widening: a shift,
# an add, a vpmaddwd and an add per row), and how far ahead of the current weights to prefetch. 1-2 rows widen
# every 4 blocks (one token alone: 5-7 % faster than every 2, in L2, one process alternated); 4 rows every 2
# (every 4 measured no faster: their per-code shifts, not the widening, fill the vector pipes)
BLOCKS_PER_STEP = {1: 4, 2: 4, 4: 2}
# Weights are prefetched PREFETCH_BYTES ahead into L2 (locality 2, `prefetcht1`), and PREFETCH_L1_BYTES ahead from
# there into L1. On a 2-vCPU Intel Xeon with AVX-512 (one process, medians of alternated runs), the 2B-4T screen
# over 0.33 GB took 19.6 ms against 23.9 ms with L1 prefetches 2048 bytes ahead, and the 210 one-token layer
# matmuls took 32.6-34.7 ms against 36.4-42.2 ms: an L1 prefetch from memory holds one of the core's few L1 miss
# buffers until its line arrives, an L2 prefetch does not. The second, short L1 prefetch (of lines by then in L2)
# read the layers at 8.5 / 14.4 GB/s on 1 / 2 threads against 7.8 / 13.8 without it. L2 distances of 8192 and 16384
# bytes were no better, non-temporal prefetches took 1.5-1.8x the time. On the AMD Zen 3 dev machines, L1, L2 and
# L3 prefetches measured the same.
PREFETCH_BYTES = 4096
PREFETCH_L1_BYTES = 512
PREFETCH_LOCALITY = 2

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


def _as_i64(context, builder, values, tys):
    """Integer arguments of an intrinsic (offsets, strides, counts) as i64 values."""
    return [context.cast(builder, v, t, types.int64) for v, t in zip(values, tys)]


def _data_ptr(context, builder, arrty, arr, offset):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(ary.data, [offset])


def _reduce_add(builder, vec):
    """<n x i32> or <n x float> -> its lane sum by halving: lanes (0..n/2) + (n/2..n) until one is left (portable,
    no reduction intrinsic needed; for floats a fixed order, the same on every host)."""
    add = builder.fadd if isinstance(vec.type.element, ir.FloatType) else builder.add
    n = vec.type.count
    while n > 1:
        half = n // 2
        lo = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, half), list(range(half, n))))
        vec = add(lo, hi)
        n = half
    return builder.extract_element(vec, ir.Constant(_I32, 0))


def _int_total(builder, vecs):
    """Integer accumulator vectors of one row -> the sum of all their lanes as one scalar: pairwise vector adds,
    then one halving reduction (integer adds: any order gives the same total)."""
    while len(vecs) > 1:
        vecs = [builder.add(vecs[k], vecs[k + 1]) if k + 1 < len(vecs) else vecs[k] for k in range(0, len(vecs), 2)]
    return _reduce_add(builder, vecs[0])


def _prefetch(builder, ptr, locality=PREFETCH_LOCALITY):
    """Software prefetch of the cache line at ptr (read; default into L2). Locality 3 (into L1) for data needed
    within a few hundred cycles (attention's K rows)."""
    fn = _get_or_insert(builder.module, "llvm.prefetch.p0i8",
                        ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]))
    builder.call(fn, [builder.bitcast(ptr, _I8.as_pointer()), ir.Constant(_I32, 0), ir.Constant(_I32, locality),
                      ir.Constant(_I32, 1)])


def _prefetch_stream(builder, base, byte_offset):
    """Prefetches for the weight line at byte_offset of base (once per 64-byte line): the line PREFETCH_BYTES ahead
    into L2 and the one PREFETCH_L1_BYTES ahead into L1. The weights of a matmul are streamed once from a memory
    map of 4 KiB pages, where the hardware prefetchers stop at each page end."""
    i64 = ir.IntType(64)
    b8 = builder.bitcast(base, _I8.as_pointer())
    _prefetch(builder, builder.gep(b8, [builder.add(byte_offset, ir.Constant(i64, PREFETCH_BYTES))]))
    _prefetch(builder, builder.gep(b8, [builder.add(byte_offset, ir.Constant(i64, PREFETCH_L1_BYTES))]), 3)


def _codes(builder, wb, one_shift):
    """32 I2_S weight bytes -> [(u8 codes or 4 x codes, which i16 sum)] for values p, 32+p, 64+p, 96+p."""
    three = _splat(_I8, 3, 32)
    if not one_shift:
        return [(builder.and_(builder.lshr(wb, _splat(_I8, s, 32)), three) if s
                 else builder.and_(wb, three), 0) for s in (6, 4, 2, 0)]
    # one 16-bit shift brings bits 4-7 of every byte down to bits 0-3 (what the pair's other byte pushes in lands
    # at 4-7 and is masked off); masks 3 and 12 then give the codes of 32+p and 96+p and four times those of p and
    # 64+p, which go to sum 1
    twelve = _splat(_I8, 12, 32)
    wh = builder.bitcast(builder.lshr(builder.bitcast(wb, _V16I16), _splat(_I16, 4, 16)), _V32I8)
    return [(builder.and_(wh, twelve), 1), (builder.and_(wh, three), 0),
            (builder.and_(wb, twelve), 1), (builder.and_(wb, three), 0)]


def _block_products(builder, wbase, qbases, blk, sums, one_shift, prefetch):
    """128-value I2_S block `blk` (an i64) of the weights at wbase against each activation row of qbases: the
    vpmaddubsw products added to the i16 lane sums sums[s][t] (sum s of row t; None: nothing yet), in place;
    `prefetch`: also prefetch PREFETCH_BYTES ahead (once per 64-byte line)."""
    i64 = ir.IntType(64)
    maddubs = _get_or_insert(builder.module, "llvm.x86.avx2.pmadd.ub.sw", ir.FunctionType(_V16I16, [_V32I8, _V32I8]))
    woff = builder.mul(blk, ir.Constant(i64, 32))
    if prefetch:
        _prefetch_stream(builder, wbase, woff)
    wb = builder.load(builder.bitcast(builder.gep(wbase, [woff]), _V32I8.as_pointer()), align=1)
    codes = _codes(builder, wb, one_shift)
    for t, qbase in enumerate(qbases):
        qb = builder.gep(qbase, [builder.mul(blk, ir.Constant(i64, 128))])
        for j, (code, k) in enumerate(codes):
            qp = builder.bitcast(builder.gep(qb, [ir.Constant(i64, 32 * j)]), _V32I8.as_pointer())
            prod = builder.call(maddubs, [code, builder.load(qp, align=1)])
            sums[k][t] = prod if sums[k][t] is None else builder.add(sums[k][t], prod)


def _lane_sums(builder, sum0, sum4=None):
    """A row's i16 lane sums (sum4: the four-times sum of the one-shift unpacking, or None) -> <8 x i32> pair sums
    (vpmaddwd against ones; sum4's lanes are multiples of 4, so its shift is exact)."""
    maddwd = _get_or_insert(builder.module, "llvm.x86.avx2.pmadd.wd", ir.FunctionType(_V8I32, [_V16I16, _V16I16]))
    s16 = sum0 if sum4 is None else builder.add(sum0, builder.ashr(sum4, _splat(_I16, 2, 16)))
    return builder.call(maddwd, [s16, _splat(_I16, 1, 16)])


def _open_loop(builder, name, runs):
    """The blocks of a counted loop that runs only if `runs` (an i1): -> (entry, loop body, exit), positioned at the
    start of the body (for `_close_loop`)."""
    entry = builder.block
    loop = builder.append_basic_block(name + "_loop")
    done = builder.append_basic_block(name + "_done")
    builder.cbranch(runs, loop, done)
    builder.position_at_end(loop)
    return entry, loop, done


def _close_loop(builder, blocks, counter, first, limit, accs, starts, new):
    """Wire a counted loop (blocks = entry, loop body, exit): `counter` (a phi) runs from `first` while below
    `limit`; accumulator phis `accs` start at `starts` and take `new` each trip. Returns, positioned in the exit
    block, the accumulators' values there (`starts` when the loop did not run)."""
    entry, loop, done = blocks
    nxt = builder.add(counter, ir.Constant(ir.IntType(64), 1))
    counter.add_incoming(first, entry)
    counter.add_incoming(nxt, loop)
    for a, s, n in zip(accs, starts, new):
        a.add_incoming(s, entry)
        a.add_incoming(n, loop)
    builder.cbranch(builder.icmp_signed("<", nxt, limit), loop, done)
    builder.position_at_end(done)
    finals = []
    for s, n in zip(starts, new):
        p = builder.phi(n.type)
        p.add_incoming(s, entry)
        p.add_incoming(n, loop)
        finals.append(p)
    return finals


def _return_rows(context, builder, signature, values, n_rows):
    """One value (n_rows == 1) or a tuple of n_rows values, as the intrinsic's signature says."""
    if n_rows == 1:
        return values[0]
    return context.make_tuple(builder, signature.return_type, values)


def _return_row_totals(context, builder, signature, accs, n_acc, n_rows):
    """Integer accumulators, n_acc per row (row t: accs[t * n_acc:(t + 1) * n_acc]) -> each row's total
    (`_int_total`), returned as the intrinsic's signature says."""
    totals = [_int_total(builder, accs[t * n_acc:(t + 1) * n_acc]) for t in range(n_rows)]
    return _return_rows(context, builder, signature, totals, n_rows)


def dot_signature(n_rows, packed, w0, q, q0, q_stride, n_blocks, scalar=types.int32):
    """Signature of a dot intrinsic over (weights, w0, activations, q0, q_stride, n_blocks) -> `scalar` (one row)
    or n_rows of them: the I2_S dots here, the head dots of simd_dense.py."""
    ret = scalar if n_rows == 1 else types.UniTuple(scalar, n_rows)
    return ret(packed, w0, q, q0, q_stride, n_blocks)


def dot_pointers(context, builder, signature, args, n_rows):
    """A dot intrinsic's arguments (weights, w0, activations, q0, q_stride, n_blocks, then any others) -> (pointer
    to its first weight element, pointers to its n_rows activation rows, n_blocks as i64)."""
    packed_v, w0_v, q_v, q0_v, stride_v, nb_v = args[:6]
    pty, wty, qty, q0ty, sty, nbty = signature.args[:6]
    w0_v, q0_v, stride_v, nb_v = _as_i64(context, builder, (w0_v, q0_v, stride_v, nb_v), (wty, q0ty, sty, nbty))
    wbase = _data_ptr(context, builder, pty, packed_v, w0_v)
    qbases = [_data_ptr(context, builder, qty, q_v,
                        builder.add(q0_v, builder.mul(stride_v, ir.Constant(ir.IntType(64), t))))
              for t in range(n_rows)]
    return wbase, qbases, nb_v


def _make_i2s_dot(n_rows, blocks_per_step):
    # one shift per 32 weight bytes (two i16 sums per row) where registers allow it: with 4 rows the extra sums
    # spill and the per-code shifts are cheaper (T = 8 and 128 measured 10 % slower with one shift)
    one_shift = n_rows <= 2
    n_sums = 2 if one_shift else 1

    @intrinsic
    def i2s_dot(typingctx, packed, w0, q, q0, q_stride, n_blocks):
        sig = dot_signature(n_rows, packed, w0, q, q0, q_stride, n_blocks)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)

            def c64(v):
                return ir.Constant(i64, v)

            wbase, qbases, nb_v = dot_pointers(context, builder, signature, args, n_rows)
            zero = ir.Constant(_V8I32, None)
            zero16 = ir.Constant(_V16I16, None)

            def blocks(first, count, sums):
                """Blocks first .. first+count-1: products added to the i16 lane sums (sums[s][t]: sum s of row
                t; None = nothing yet) -> new sums."""
                sums = [list(row) for row in sums]
                for u in range(count):
                    blk = builder.add(first, c64(u)) if u else first
                    _block_products(builder, wbase, qbases, blk, sums, one_shift, u % 2 == 0)
                return sums

            def widen(accs, sums):
                """i32 accumulators += sum 0 (+ sum 1 / 4: its lanes are multiples of 4, the shift is exact)."""
                return [builder.add(accs[t], _lane_sums(builder, sums[0][t], sums[1][t] if n_sums == 2 else None))
                        for t in range(n_rows)]

            def phis(ty, incoming):
                out = []
                for t in range(n_rows):
                    p = builder.phi(ty)
                    for value, block in incoming:
                        p.add_incoming(value[t], block)
                    out.append(p)
                return out

            # main loop: blocks_per_step blocks per iteration summed in i16 lanes, widened once; then the
            # remaining blocks one per iteration into i16 lane sums, widened once at the end
            n_steps = builder.sdiv(nb_v, c64(blocks_per_step))
            tail_start = builder.mul(n_steps, c64(blocks_per_step))
            zeros = [zero] * n_rows
            zeros16 = [[zero16] * n_rows for _ in range(n_sums)]
            entry = builder.block
            main = builder.append_basic_block("i2s_main")
            after_main = builder.append_basic_block("i2s_after_main")
            tail = builder.append_basic_block("i2s_tail")
            after_tail = builder.append_basic_block("i2s_after_tail")
            builder.cbranch(builder.icmp_signed(">", n_steps, c64(0)), main, after_main)

            builder.position_at_end(main)
            i = builder.phi(i64)
            accs = [builder.phi(_V8I32) for _ in range(n_rows)]
            new = widen(accs, blocks(builder.mul(i, c64(blocks_per_step)), blocks_per_step,
                                     [[None] * n_rows for _ in range(n_sums)]))
            i_next = builder.add(i, c64(1))
            i.add_incoming(c64(0), entry)
            i.add_incoming(i_next, main)
            for t in range(n_rows):
                accs[t].add_incoming(zero, entry)
                accs[t].add_incoming(new[t], main)
            builder.cbranch(builder.icmp_signed("<", i_next, n_steps), main, after_main)

            builder.position_at_end(after_main)
            mid = phis(_V8I32, [(zeros, entry), (new, main)])
            builder.cbranch(builder.icmp_signed("<", tail_start, nb_v), tail, after_tail)

            builder.position_at_end(tail)
            j = builder.phi(i64)
            t16 = [[builder.phi(_V16I16) for _ in range(n_rows)] for _ in range(n_sums)]
            tnew = blocks(j, 1, t16)
            j_next = builder.add(j, c64(1))
            j.add_incoming(tail_start, after_main)
            j.add_incoming(j_next, tail)
            for k in range(n_sums):
                for t in range(n_rows):
                    t16[k][t].add_incoming(zero16, after_main)
                    t16[k][t].add_incoming(tnew[k][t], tail)
            builder.cbranch(builder.icmp_signed("<", j_next, nb_v), tail, after_tail)

            builder.position_at_end(after_tail)
            last16 = [phis(_V16I16, [(zeros16[k], after_main), (tnew[k], tail)]) for k in range(n_sums)]
            final = widen(mid, last16)
            return _return_rows(context, builder, signature, [_reduce_add(builder, f) for f in final], n_rows)

        return sig, codegen

    return i2s_dot


i2s_dot1 = _make_i2s_dot(1, BLOCKS_PER_STEP[1])
i2s_dot2 = _make_i2s_dot(2, BLOCKS_PER_STEP[2])
i2s_dot4 = _make_i2s_dot(4, BLOCKS_PER_STEP[4])


@intrinsic
def i32_as_f32(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (a bit cast; any host)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def f16_to_f32(typingctx, bits):
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        h = builder.bitcast(builder.trunc(args[0], _I16) if args[0].type != _I16 else args[0], ir.HalfType())
        return builder.fpext(h, ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_f16_bits(typingctx, value):
    """float32 -> its nearest float16 (ties to even, as numpy's astype), as u16 bits (`fptrunc`, vectorizes to
    vcvtps2ph where the host has F16C)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return sig, codegen
