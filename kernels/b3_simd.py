"""The base-3 ternary layout ("B3", 1.6 bits per weight) and the vector code that reads it, for hosts with
AVX-512 VBMI, BW and VNNI (Intel Sapphire Rapids and later, AMD Genoa): `HAVE_B3`.

A decoded token reads every ternary weight once, and the bytes are the bound: I2_S spends 2 bits on a weight of
three values, five of them fit one byte (3^5 = 243). Layout of an M x K matrix (M a multiple of 16; codes c = w + 1
in {0, 1, 2}; K padded with code-0 columns to Kp, a multiple of SB_K = 320, whose activations are zero):

- row tile r (rows 16 r .. 16 r + 15) is Kp / 320 super-blocks of SB_BYTES = 1024 bytes, row tiles one after
  another: u8[M / 16, Kp / 320, 1024], M Kp / 5 bytes in all;
- byte b of super-block s holds five codes c_0..c_4, c_i being byte b of the super-block's tile i: the 64 K values
  320 s + 64 i .. + 63 of the row tile in the order of an AMX B tile (byte b = 64 z + 4 n + j holds row 16 r + n,
  K value 320 s + 64 i + 4 z + j). With v = c_0 + 3 c_1 + 9 c_2 + 27 c_3 (0..80) the byte is v where c_4 = 0,
  81 + v where c_4 = 1 and 162 + (v + 47) mod 81 where c_4 = 2 (`ENCODE`), so that
  c_4 = [byte >= 81] + [byte >= 162] and the first four codes are QUAD_TABLE[(byte - 81 [byte >= 81]) mod 128]: the
  bytes of c_4 = 2 whose index would wrap past 127 land on the entries of the same four codes (v <= 33 -> v),
  the others on entries 81..127.

Decoding a 64-byte line of a super-block (line z) gives line z of all five tiles: two byte compares, one masked
subtraction and one 128-entry table lookup (`vpermi2b`) give each byte's first four codes as one I2_S-style byte
(c0 | c1 << 2 | c2 << 4 | c3 << 6), masks split it, and the compares' masks give the fifth code. (The first form,
256-entry tables for both, took four `vpermi2b` per line, each three micro-ops, two of them on the one shuffle
port: 1.37x the time per line in cache.) Dot products: dword lane n of a `vpdpbusd` on line z of tile i against
the four activations q[320 s + 64 i + 4 z:][:4] (broadcast) sums row n's four products, so each accumulator holds
16 rows and no lanes are summed at the end; AMX prefill stores the decoded lines as its code tiles directly
(kernels.amx). The integers are those of the I2_S kernels (sum(c q) - sum(q)), so outputs are the same bits.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .config import JIT, JIT_PARALLEL, USE_B3
from .simd import (HAVE_AVX512, _FEATURES, _as_i64, _close_loop, _data_ptr, _get_or_insert, _open_loop,
                   _prefetch_stream)
from .simd_avx512 import _c64

SB_K = 320  # K values per super-block (five 64-value tiles)
SB_BYTES = 1024  # bytes per super-block of 16 rows
TILE_ROWS = 16
LINE_BYTES = 64
HAVE_B3 = USE_B3 and HAVE_AVX512 and "avx512vbmi" in _FEATURES

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V64I8 = ir.VectorType(_I8, 64)
_V16I32 = ir.VectorType(_I32, 16)


@njit(**JIT)
def padded_k(k):
    """K rounded up to whole super-blocks."""
    return (k + SB_K - 1) // SB_K * SB_K


def b3_bytes(m: int, k: int) -> int:
    return m * padded_k(k) // 5


def _quad(v):
    """v = c0 + 3 c1 + 9 c2 + 27 c3 -> c0 | c1 << 2 | c2 << 4 | c3 << 6."""
    d = [(v // 3 ** i) % 3 for i in range(4)]
    return d[0] | d[1] << 2 | d[2] << 4 | d[3] << 6


def _code_tables():
    """-> (u8[243] the byte of v = sum_i 3^i c_i (i < 5), u8[128] the first four codes of a lookup index)."""
    v, c4 = np.arange(243) % 81, np.arange(243) // 81
    encode = np.where(c4 == 0, v, np.where(c4 == 1, 81 + v, 162 + (v + 47) % 81))
    index = np.arange(128)
    quad = _quad(np.where(index < 81, index, index - 47))
    return encode.astype(np.uint8), quad.astype(np.uint8)


ENCODE, QUAD_TABLE = _code_tables()


def _bytes(values):
    return ir.Constant(_V64I8, [ir.Constant(_I8, int(x)) for x in values])


def _decode_line(builder, ptr, scaled=False):
    """The 64-byte line at ptr -> five <64 x i8> code vectors (line z of tiles 0..4). scaled: the first four
    left in place (c_j << 2 j: masks without shifts, the dot's sums are then 4^j times theirs; SCALE_SHIFTS)."""
    permute = _get_or_insert(builder.module, "llvm.x86.avx512.vpermi2var.qi.512",
                             ir.FunctionType(_V64I8, [_V64I8, _V64I8, _V64I8]))
    b = builder.load(builder.bitcast(ptr, _V64I8.as_pointer()), align=1)
    past81 = builder.icmp_unsigned(">=", b, _bytes([81] * 64))
    past162 = builder.icmp_unsigned(">=", b, _bytes([162] * 64))
    index = builder.select(past81, builder.sub(b, _bytes([81] * 64)), b)  # vpermi2b reads its low 7 bits
    quad = builder.call(permute, [_bytes(QUAD_TABLE[0:64]), index, _bytes(QUAD_TABLE[64:128])])
    if scaled:
        codes = [builder.and_(quad, _bytes([3 << (2 * j)] * 64)) for j in range(4)]
    else:
        three = _bytes([3] * 64)
        codes = [builder.and_(quad, three)]
        codes += [builder.and_(builder.lshr(quad, _bytes([s] * 64)), three) for s in (2, 4)]
        codes.append(builder.lshr(quad, _bytes([6] * 64)))
    one = builder.select(past81, _bytes([1] * 64), _bytes([0] * 64))  # masked moves: two micro-ops
    codes.append(builder.select(past162, builder.add(one, _bytes([1] * 64)), one))
    return codes


SCALE_SHIFTS = (0, 2, 4, 6, 0)  # _decode_line(scaled=True): code vector i holds c_i << SCALE_SHIFTS[i]


def _broadcast_i32(builder, ptr):
    """The four bytes at ptr as an i32 in all 16 lanes (vpdpbusd's {1to16} operand)."""
    v = builder.load(builder.bitcast(ptr, _I32.as_pointer()), align=1)
    v = builder.insert_element(ir.Constant(_V16I32, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), [0] * 16))


def _make_b3_dots(n_tok):
    # one and one token: an accumulator per code vector, scaled codes (no shifts: 16 vector operations per line
    # instead of 19); four: two accumulators per token (registers), codes shifted down
    scaled = n_tok <= 2
    n_acc = 5 if scaled else 2

    @intrinsic
    def b3_dots(typingctx, packed, w0, q, q0, q_stride, n_lines, sums, s0):
        """Row tile at packed[w0:] (n_lines 64-byte lines: 16 per super-block) against n_tok activation rows
        q[q0 + t q_stride:] (i8, Kp long) -> sums[s0 + 16 t + n] (i32): sum over K of code[n, k] * q[t, k]."""
        sig = types.void(packed, w0, q, q0, q_stride, n_lines, sums, s0)

        def codegen(context, builder, signature, args):
            at = signature.args
            w0v, q0v, qs, nl, s0v = _as_i64(context, builder, (args[1], args[3], args[4], args[5], args[7]),
                                            (at[1], at[3], at[4], at[5], at[7]))
            wbase = _data_ptr(context, builder, at[0], args[0], w0v)
            qbases = [_data_ptr(context, builder, at[2], args[2], builder.add(q0v, builder.mul(qs, _c64(t))))
                      for t in range(n_tok)]
            dpbusd = _get_or_insert(builder.module, "llvm.x86.avx512.vpdpbusd.512",
                                    ir.FunctionType(_V16I32, [_V16I32] * 3))
            zeros = [ir.Constant(_V16I32, None)] * (n_tok * n_acc)
            n_sb = builder.sdiv(nl, _c64(16))
            blocks = _open_loop(builder, "b3_dots", builder.icmp_signed(">", n_sb, _c64(0)))
            sb = builder.phi(_I64)
            accs = [builder.phi(_V16I32) for _ in zeros]
            wsb = builder.gep(wbase, [builder.mul(sb, _c64(SB_BYTES))])
            qsb = [builder.gep(qb, [builder.mul(sb, _c64(SB_K))]) for qb in qbases]
            new = list(accs)
            for z in range(16):  # the super-block's lines, unrolled: constant offsets
                _prefetch_stream(builder, wsb, _c64(LINE_BYTES * z))
                codes = _decode_line(builder, builder.gep(wsb, [_c64(LINE_BYTES * z)]), scaled)
                for t in range(n_tok):
                    for i in range(5):
                        qv = _broadcast_i32(builder, builder.gep(qsb[t], [_c64(64 * i + 4 * z)]))
                        a = t * n_acc + i % n_acc
                        new[a] = builder.call(dpbusd, [new[a], builder.bitcast(codes[i], _V16I32), qv])
            final = _close_loop(builder, blocks, sb, _c64(0), n_sb, accs, zeros, new)
            sbase = _data_ptr(context, builder, at[6], args[6], s0v)
            for t in range(n_tok):
                parts = final[t * n_acc:(t + 1) * n_acc]
                if scaled:  # exact: each sum of scaled codes is a multiple of its scale
                    parts = [builder.ashr(v, ir.Constant(_V16I32, [ir.Constant(_I32, sh)] * 16)) if sh else v
                             for v, sh in zip(parts, SCALE_SHIFTS)]
                total = parts[0]
                for v in parts[1:]:
                    total = builder.add(total, v)
                dst = builder.gep(sbase, [_c64(16 * t)])
                builder.store(total, builder.bitcast(dst, _V16I32.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return b3_dots


b3_dots1, b3_dots2, b3_dots4 = _make_b3_dots(1), _make_b3_dots(2), _make_b3_dots(4)


@intrinsic
def b3_unpack_lines(typingctx, packed, w0, n_lines, codes, c0):
    """Row tile at packed[w0:] (n_lines lines) -> codes[c0:] (u8[Kp / 64, 16, 64]): AMX B tiles in K order,
    line z of super-block s giving line z of tiles 5 s .. 5 s + 4."""
    sig = types.void(packed, w0, n_lines, codes, c0)

    def codegen(context, builder, signature, args):
        at = signature.args
        w0v, nl, c0v = _as_i64(context, builder, (args[1], args[2], args[4]), (at[1], at[2], at[4]))
        wbase = _data_ptr(context, builder, at[0], args[0], w0v)
        cbase = _data_ptr(context, builder, at[3], args[3], c0v)
        blocks = _open_loop(builder, "b3_unpack", builder.icmp_signed(">", nl, _c64(0)))
        j = builder.phi(_I64)
        codes = _decode_line(builder, builder.gep(wbase, [builder.mul(j, _c64(LINE_BYTES))]))
        first = builder.add(builder.mul(builder.lshr(j, _c64(4)), _c64(5 * SB_BYTES)),
                            builder.mul(builder.and_(j, _c64(15)), _c64(LINE_BYTES)))
        for i in range(5):
            dst = builder.gep(cbase, [builder.add(first, _c64(SB_BYTES * i))])
            builder.store(codes[i], builder.bitcast(dst, _V64I8.as_pointer()), align=1)
        _close_loop(builder, blocks, j, _c64(0), nl, [], [], [])
        return context.get_dummy_value()

    return sig, codegen


@njit(**JIT)
def _i2s_rows_to_codes(packed, row_bytes, m0, codes):
    """Rows m0 .. m0 + 15 of I2_S bytes -> codes: u8[16, Kp] (w + 1; past K: 0)."""
    codes[:] = 0
    for n in range(TILE_ROWS):
        o = (m0 + n) * row_bytes
        for blk in range(row_bytes // 32):
            for p in range(32):
                byte = packed[o + blk * 32 + p]
                k = blk * 128 + p
                codes[n, k] = byte >> 6
                codes[n, k + 32] = (byte >> 4) & 3
                codes[n, k + 64] = (byte >> 2) & 3
                codes[n, k + 96] = byte & 3


@njit(**JIT_PARALLEL)
def pack_b3_from_i2s(packed, m, k, out):
    """I2_S bytes u8[m k / 4] (m % 16 == 0, k % 128 == 0) -> out: u8[m Kp / 5] in B3 layout (module
    docstring). Returns how many row tiles hold a code 3 (no ternary weight: such a matrix stays I2_S)."""
    kp = padded_k(k)
    n_sb = kp // SB_K
    bad = np.zeros(m // TILE_ROWS, np.int64)
    for r in prange(m // TILE_ROWS):
        codes = np.empty((TILE_ROWS, kp), np.uint8)
        _i2s_rows_to_codes(packed, k // 4, r * TILE_ROWS, codes)
        for n in range(TILE_ROWS):
            for kk in range(k):
                if codes[n, kk] == 3:
                    bad[r] = 1
        for s in range(n_sb):
            base = (r * n_sb + s) * SB_BYTES
            for z in range(16):
                for n in range(TILE_ROWS):
                    for j in range(4):
                        k0 = s * SB_K + 4 * z + j
                        v = (codes[n, k0] + 3 * codes[n, k0 + 64] + 9 * codes[n, k0 + 128]
                             + 27 * codes[n, k0 + 192] + 81 * codes[n, k0 + 256])
                        out[base + 64 * z + 4 * n + j] = ENCODE[min(v, 242)]  # past 242: a code 3, reported
    return bad.sum()
