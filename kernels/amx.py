"""Ternary prefill matmuls on Intel AMX tiles (hosts with AMX-INT8: Sapphire Rapids and later; GCP h3).

One `tdpbsud` multiplies a 16 x 64 tile of int8 activations (16 tokens) by a 64 x 16 tile of unsigned weight codes
(16 output rows), 16384 exact integer products into 16 x 16 int32 sums: the work of 64 `vpdpbusd` in one
instruction. `i2s_rows_amx` computes rows [m_lo, m_hi) (a multiple of 16 apart) of kernels.ternary_matmul's I2_S
matmul for 16 or more tokens with the same integers as the VNNI and plain kernels (sum(code * q) - sum(q)), so
its outputs are the same bits.

Order of K: any order gives the same integer sums if activations and weights share it. A tile's 64 K values are
16 weight bytes p0 <= p < p0 + 16 of one I2_S block (chunk c: block c // 2, p0 = 16 (c % 2)) times their four
2-bit fields: B row r holds, for each of the 16 output rows n, the four codes of byte p0 + r (shifts 6, 4, 2, 0:
values p, p + 32, p + 64, p + 96 of the block); `permute_activations` writes the activations in that order, padded
with zero rows to a multiple of 16 tokens.

Tiles in a 2 x 2 block (two token tiles against two groups of 16 rows: four sums tiles, and each activation and
code tile loaded once for two products): with one sums tile, each product loaded 2 KiB from L2, more than L2
delivers in one `tdpbsud`; in one process against that form, pp128 1.23x (6 of 6 rounds), the 2560 x 6912 matmul
(ffn_down) 1007 against 441 GMAC/s at 128 tokens.

AMX registers are per thread and need the process's permission (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked
once at import): `HAVE_AMX` is False where the CPU lacks AMX-INT8, the kernel refuses it, or BITNET_PY_AMX=0.
Every task loads the tile configuration (`tile_config`) and releases the tiles when done.
"""
import ctypes

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .config import JIT, USE_AMX
from .simd import _FEATURES, _as_i64, _close_loop, _data_ptr, _get_or_insert, _open_loop, _prefetch

TILE_ROWS = 16  # tokens per A tile, output rows per B tile
TILE_K = 64  # K values per tile (bytes per A row)
_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
# tile registers: sums of (token tile i, row group j) in 2 i + j, activations of token tile i in 4 + i, weight
# codes of row group j in 6 + j: a 2 x 2 block, so each tile loaded from L2 feeds two products
_SUMS, _ACTS, _CODES = (0, 1, 2, 3), (4, 5), (6, 7)


def _request_amx() -> bool:
    """Ask Linux for the AMX tile data state for this process (all its threads); True if granted."""
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM,
                                                        _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):  # pragma: no cover - not Linux / no syscall
        return False


# the codes are unpacked with AVX-512 VBMI byte permutes (every AMX CPU has them)
HAVE_AMX = USE_AMX and {"amx-tile", "amx-int8", "avx512vbmi", "avx512bw"} <= _FEATURES and _request_amx()

_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_VOID = ir.VoidType()
_P8 = _I8.as_pointer()


def _fn(builder, name, args):
    return _get_or_insert(builder.module, "llvm.x86." + name, ir.FunctionType(_VOID, args))


def _tile(n):
    return ir.Constant(_I8, n)


def _pointer(context, builder, arrty, arr, offset, offty):
    (off,) = _as_i64(context, builder, (offset,), (offty,))
    return builder.bitcast(_data_ptr(context, builder, arrty, arr, off), _P8)


@intrinsic
def tile_config(typingctx, cfg):
    """Load the 64-byte tile configuration cfg (u8[64], `tile_config_bytes`) into this thread's AMX unit."""
    def codegen(context, builder, signature, args):
        builder.call(_fn(builder, "ldtilecfg", [_P8]), [_pointer(context, builder, signature.args[0], args[0],
                                                                   ir.Constant(_I64, 0), types.int64)])
        return context.get_dummy_value()
    return types.void(cfg), codegen


@intrinsic
def tile_release(typingctx):
    """Return this thread's tiles to their initial state."""
    def codegen(context, builder, signature, args):
        builder.call(_fn(builder, "tilerelease", []), [])
        return context.get_dummy_value()
    return types.void(), codegen


def _make_tile_zero(tile):
    @intrinsic
    def tile_zero(typingctx):
        def codegen(context, builder, signature, args):
            builder.call(_fn(builder, "tilezero", [_I8]), [_tile(tile)])
            return context.get_dummy_value()
        return types.void(), codegen
    return tile_zero


def _make_tile_io(name, tile):
    @intrinsic
    def tile_io(typingctx, arr, offset, stride):
        """Tile `tile` from / to 16 rows of 64 bytes, `stride` bytes apart, from element `offset` of arr."""
        def codegen(context, builder, signature, args):
            ptr = _pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1])
            (stride,) = _as_i64(context, builder, (args[2],), (signature.args[2],))
            builder.call(_fn(builder, name, [_I8, _P8, _I64]), [_tile(tile), ptr, stride])
            return context.get_dummy_value()
        return types.void(arr, offset, stride), codegen
    return tile_io


def _make_tile_dot(sums, acts, codes):
    @intrinsic
    def tile_dot(typingctx):
        """sums[t, n] += sum over the tile's 64 K of activations[t, k] (signed) * codes[k, n] (unsigned)."""
        def codegen(context, builder, signature, args):
            builder.call(_fn(builder, "tdpbsud", [_I8, _I8, _I8]), [_tile(sums), _tile(acts), _tile(codes)])
            return context.get_dummy_value()
        return types.void(), codegen
    return tile_dot


zero_sums0, zero_sums1, zero_sums2, zero_sums3 = (_make_tile_zero(t) for t in _SUMS)
store_sums0, store_sums1, store_sums2, store_sums3 = (_make_tile_io("tilestored64", t) for t in _SUMS)
load_acts0, load_acts1 = (_make_tile_io("tileloadd64", t) for t in _ACTS)
load_codes0, load_codes1 = (_make_tile_io("tileloadd64", t) for t in _CODES)
dot00, dot01, dot10, dot11 = (_make_tile_dot(_SUMS[2 * i + j], _ACTS[i], _CODES[j]) for i in range(2)
                              for j in range(2))


@njit(**JIT)
def tile_config_bytes():
    """-> u8[64]: palette 1, tiles 0-7 of 16 rows x 64 bytes (sums: 16 int32 per row; activations; codes)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = TILE_K  # bytes per row (u16, little-endian)
        cfg[48 + t] = TILE_ROWS
    return cfg


@njit(**JIT)
def permute_activations(q):
    """q: i8[T, K] (K a multiple of 128) -> i8[ceil(T / 16) * 16, K] in the tiles' K order (module docstring),
    zero rows past T."""
    T, K = q.shape
    out = np.zeros(((T + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS, K), np.int8)
    for t in range(T):
        for c in range(K // TILE_K):
            k0 = (c // 2) * 128 + 16 * (c % 2)
            for r in range(16):
                for j in range(4):
                    out[t, c * TILE_K + 4 * r + j] = q[t, k0 + r + 32 * j]
    return out


_V16I8 = ir.VectorType(_I8, 16)
_V64I8 = ir.VectorType(_I8, 64)
_I32 = ir.IntType(32)


def _shuffle(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(lanes)), lanes))


@intrinsic
def prefetch_lines(typingctx, arr, offset, n_lines):
    """Prefetch n_lines (a constant-size loop) 64-byte lines into L2 from element `offset` of arr (u8) on."""
    sig = types.void(arr, offset, n_lines)

    def codegen(context, builder, signature, args):
        (off, n) = _as_i64(context, builder, (args[1], args[2]), signature.args[1:])
        base = _data_ptr(context, builder, signature.args[0], args[0], off)
        blocks = _open_loop(builder, "amx_pf", builder.icmp_signed(">", n, ir.Constant(_I64, 0)))
        line = builder.phi(_I64)
        _prefetch(builder, builder.gep(base, [builder.mul(line, ir.Constant(_I64, 64))]))
        _close_loop(builder, blocks, line, ir.Constant(_I64, 0), n, [], [], [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def unpack_tile_codes(typingctx, packed, w0, row_bytes, codes, c0):
    """One B tile: the 16 bytes at packed[w0 + n * row_bytes:][:16] of 16 weight rows n -> codes[c0:c0 + 1024]
    (u8), row r = for each n the four 2-bit fields of byte r of row n (shifts 6, 4, 2, 0). Four registers of
    four rows each, a byte transpose by permutes (`vpermt2b`), then `vpmultishiftqb` picks each field."""
    sig = types.void(packed, w0, row_bytes, codes, c0)

    def codegen(context, builder, signature, args):
        pty, wty, rty, cty, c0ty = signature.args
        w0_v, rb_v, c0_v = _as_i64(context, builder, (args[1], args[2], args[4]), (wty, rty, c0ty))
        src = _data_ptr(context, builder, pty, args[0], w0_v)
        dst = _data_ptr(context, builder, cty, args[3], c0_v)
        rows = [builder.load(builder.bitcast(builder.gep(src, [builder.mul(rb_v, ir.Constant(_I64, n))]),
                                             _V16I8.as_pointer()), align=1) for n in range(TILE_ROWS)]
        quads = []  # four <64 x i8>: rows 4g .. 4g + 3, 16 bytes each
        for g in range(4):
            lo = _shuffle(builder, rows[4 * g], rows[4 * g + 1], list(range(32)))
            hi = _shuffle(builder, rows[4 * g + 2], rows[4 * g + 3], list(range(32)))
            quads.append(_shuffle(builder, lo, hi, list(range(64))))
        multishift = _get_or_insert(builder.module, "llvm.x86.avx512.pmultishift.qb.512",
                                    ir.FunctionType(_V64I8, [_V64I8, _V64I8]))
        # output byte 4n + j (byte i of its 8-byte lane: field j of the lane's byte 4 (i // 4)): bit offset
        shifts = ir.Constant(_V64I8, [32 * ((i % 8) // 4) + 6 - 2 * (i % 4) for i in range(64)])
        three = ir.Constant(_V64I8, [3] * 64)
        for r in range(16):
            # byte r of row n (quad n // 4, lane n % 4), four times, at 4n .. 4n + 3
            first = _shuffle(builder, quads[0], quads[1], [64 * (n // 4) + 16 * (n % 4) + r for n in range(8)
                                                          for _ in range(4)] + [0] * 32)
            second = _shuffle(builder, quads[2], quads[3], [64 * (n // 4) + 16 * (n % 4) + r for n in range(8)
                                                           for _ in range(4)] + [0] * 32)
            spread = _shuffle(builder, first, second, list(range(32)) + list(range(64, 96)))
            fields = builder.and_(builder.call(multishift, [shifts, spread]), three)
            out = builder.gep(dst, [ir.Constant(_I64, 64 * r)])
            builder.store(fields, builder.bitcast(out, _V64I8.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(**JIT)
def _unpack_codes(packed, m0, row_bytes, codes):
    """Rows m0 <= m < m0 + 16 of the I2_S weights -> codes: u8[K / 64, 16, 64], B tiles in the module's K
    order (codes[c, r, 4 n + j] = field j of byte p0 + r of row m0 + n in chunk c)."""
    cf = codes.reshape(-1)
    n_chunks = codes.shape[0]
    share = TILE_ROWS * row_bytes // n_chunks  # the next 16 rows' bytes, prefetched a share per chunk
    end = min(packed.shape[0], (m0 + 2 * TILE_ROWS) * row_bytes)
    for c in range(n_chunks):
        pf = (m0 + TILE_ROWS) * row_bytes + c * share
        prefetch_lines(packed, pf, max(0, min(share, end - pf)) // 64)
        unpack_tile_codes(packed, m0 * row_bytes + (c // 2) * 32 + 16 * (c % 2), row_bytes, cf,
                          c * TILE_ROWS * TILE_K)


@njit(**JIT)
def _store_outputs(sums, t0, m0, T, act_scales, act_sums, scale, out):
    """sums: i32[16, 16] of tokens t0.. and rows m0.. -> out[t, m] (tokens below T)."""
    for i in range(min(TILE_ROWS, T - t0)):
        t = t0 + i
        for n in range(TILE_ROWS):
            out[t, m0 + n] = np.float32(sums[i, n] - act_sums[t]) / act_scales[t] * scale


@njit(**JIT)
def tile_products(qf, K, Tp, T, c0f, c1f, pair, m0, sums, act_scales, act_sums, scale, out):
    """Code tiles of one row group (c0f: u8, K / 64 tiles) or two (pair: c1f too) against all token tiles of the
    activations qf (i8[Tp * K], in the codes' K order) -> out rows m0 .. (tokens below T). The tiles are
    configured (tile_config) by the caller."""
    n_chunks = K // TILE_K
    tile_size = TILE_ROWS * TILE_K
    for t0 in range(0, Tp, 2 * TILE_ROWS):
        two = t0 + 2 * TILE_ROWS <= Tp
        zero_sums0()
        zero_sums1()
        zero_sums2()
        zero_sums3()
        for c in range(n_chunks):
            load_acts0(qf, t0 * K + c * TILE_K, K)
            load_codes0(c0f, c * tile_size, TILE_K)
            dot00()
            if pair:
                load_codes1(c1f, c * tile_size, TILE_K)
                dot01()
            if two:
                load_acts1(qf, (t0 + TILE_ROWS) * K + c * TILE_K, K)
                dot10()
                if pair:
                    dot11()
        sf = sums.reshape(-1)
        store_sums0(sf, 0, 4 * TILE_ROWS)
        store_sums1(sf, tile_size // 4, 4 * TILE_ROWS)
        store_sums2(sf, 2 * tile_size // 4, 4 * TILE_ROWS)
        store_sums3(sf, 3 * tile_size // 4, 4 * TILE_ROWS)
        for i in range(2 if two else 1):
            for j in range(2 if pair else 1):
                _store_outputs(sums[2 * i + j], t0 + i * TILE_ROWS, m0 + j * TILE_ROWS, T, act_scales,
                               act_sums, scale, out)


@njit(**JIT)
def i2s_rows_amx(packed, qp, T, act_scales, act_sums, scale, out, m_lo, m_hi, cfg):
    """Rows [m_lo, m_hi) (m_hi - m_lo a multiple of 16) of out[:T] = I2_S weights x activations, from qp =
    permute_activations(q): out[t, m] = float32(sum(code * q) - act_sums[t]) / act_scales[t] * scale. Pairs of
    row groups against pairs of token tiles (four sums tiles, each activation and code tile used twice); a last
    single row group or token tile uses the same products with the pair's other half left out."""
    K = qp.shape[1]
    n_chunks = K // TILE_K
    row_bytes = K // 4
    codes = np.empty((2, n_chunks, TILE_ROWS, TILE_K), np.uint8)
    sums = np.empty((4, TILE_ROWS, TILE_ROWS), np.int32)
    c0f, c1f = codes[0].reshape(-1), codes[1].reshape(-1)
    tile_config(cfg)
    for m0 in range(m_lo, m_hi, 2 * TILE_ROWS):
        pair = m0 + 2 * TILE_ROWS <= m_hi
        _unpack_codes(packed, m0, row_bytes, codes[0])
        if pair:
            _unpack_codes(packed, m0 + TILE_ROWS, row_bytes, codes[1])
        tile_products(qp.reshape(-1), K, qp.shape[0], T, c0f, c1f, pair, m0, sums, act_scales, act_sums, scale,
                      out)
    tile_release()
