"""GGUF tensors -> per-layer weights in the layouts the kernels want, prepared once at load.

Ternary weights (I2_S, TL2, TQ1_0, TQ2_0) all end up in I2_S's packed layout: I2_S tensors are used
zero-copy from the memory map, the others are decoded and repacked once. On hosts with AVX-512 VBMI + VNNI the
per-tensor-scaled ones (I2_S, TL2) go one step further, to the base-3 layout (kernels.b3_simd: 1.6 bits per
weight, 0.8x the bytes a decoded token reads), kept in the repack cache like the TL2 repack. Float weights stay
memory-mapped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from kernels.select import b3_enabled, use_b3
from kernels.tl2_repack import pack_i2s, tl2_to_i2s_packed, tq2_0_to_i2s_packed

from .b3_repack import B3Arena, cached_b3, to_b3
from .config import ModelConfig
from .gguf.constants import DEQUANT_TYPES, I2S_BLOCK, REPACKED_TYPES, TL2_ROWPERM, TQ_BLOCK, GGMLType
from .gguf.reader import GGUFError, GGUFFile, TensorInfo
from .gguf.ternary_unpack import i2s_scale, tl2_region, unpack_tq1_0
from .gguf.tl2_tiling import TL2Tile
from .repack_cache import TQ_SCALES_SUFFIX, RepackCache, cache_enabled, read_only
from .screened_head import CACHE_SUFFIXES as SCREEN_CACHE_SUFFIXES, ScreenedHead, cached_head, quantize_head

log = logging.getLogger(__name__)

I2S_ACT_FLOOR = 1e-5  # bitnet.cpp floors the activation absmax at 1e-5 for I2_S ...
TL2_ACT_FLOOR = 0.0  # ... and not for TL2


@dataclass
class TernaryWeight:
    """y = W x with W ternary: packed u8[M*K/4] in I2_S layout (or u8[M*Kp/5] in the base-3 layout), one scale
    or per-256-block scales."""
    m: int
    k: int
    packed: np.ndarray  # u8[M*K/4] ("i2_s") or u8[M*Kp/5] ("b3", kernels.b3_simd)
    scale: np.float32  # per-tensor scale (I2_S, TL2)
    block_scales: np.ndarray | None  # f32[M, K/256] for TQ1_0 / TQ2_0, else None
    act_floor: float
    source_type: str
    layout: str = "i2_s"


@dataclass
class DenseWeight:
    """y = W x with float weights: f32[M, K] (no activation rounding) or f16 bits u16[M, K]
    (the activation is rounded to f16 first, as ggml does); or, for the optional int8 head, i8[M, K] with
    per-row scales (activation quantized to int8 per token; approximate)."""
    m: int
    k: int
    f32: np.ndarray | None
    f16_bits: np.ndarray | None
    source_type: str
    i8: np.ndarray | None = None  # i8[M, K]
    i8_scales: np.ndarray | None = None  # f32[M]


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # f32[E]
    wq: TernaryWeight | DenseWeight
    wk: TernaryWeight | DenseWeight
    wv: TernaryWeight | DenseWeight
    wo: TernaryWeight | DenseWeight
    attn_sub_norm: np.ndarray | None  # f32[q_dim]
    ffn_norm: np.ndarray  # f32[E]
    w_gate: TernaryWeight | DenseWeight
    w_up: TernaryWeight | DenseWeight
    w_down: TernaryWeight | DenseWeight
    ffn_sub_norm: np.ndarray | None  # f32[F]


@dataclass
class ModelWeights:
    token_embd: TensorInfo
    layers: list[LayerWeights]
    output_norm: np.ndarray  # f32[E]
    output: DenseWeight  # [n_vocab, E]; the tied embedding when the file has no output.weight
    tl2_source: str = ""  # TL2 files: "repack cache" (mapped) or "decoded" (at this load); "" otherwise
    screen: ScreenedHead | None = None  # the f16 head's int8 copy (screened or int8 head), when asked for
    repack_map: np.ndarray | None = None  # u8: the repack cache file's map that repacked tensors are read from
    repack_skip: list[tuple[int, int]] = field(default_factory=list)  # byte ranges of it this load does not read


def tl2_to_i2s(raw: np.ndarray, m: int, k: int, tile: TL2Tile) -> tuple[np.ndarray, np.float32]:
    """TL2 bytes -> (I2_S-packed u8[m*k/4], scale); compiled loops (same decoding as unpack_tl2)."""
    if m % tile.bm or tile.bm % 32 or tile.bk % 24:
        raise GGUFError(f"TL2 tiling BM={tile.bm}, BK={tile.bk} does not fit weight {m}x{k}")
    packed = np.empty(m * k // 4, np.uint8)
    tl2_to_i2s_packed(raw, m, k, tile.bm, tile.bk, np.array(TL2_ROWPERM, np.int64), packed)
    return read_only(packed), tl2_scale(raw, m, k)


def tl2_scale(raw: np.ndarray, m: int, k: int) -> np.float32:
    """The per-tensor scale stored after a TL2 tensor's packed bytes."""
    return raw[tl2_region(m, k):tl2_region(m, k) + 4].view("<f4")[0]


def _float_vector(f: GGUFFile, name: str, n: int) -> np.ndarray:
    info = f.info(name)
    if info.type_id != GGMLType.F32 or info.np_shape != (n,):
        raise GGUFError(f"{f.path}: tensor {name} must be F32[{n}], found {info.type_name}{list(info.np_shape)}")
    return f.array(name)


def _dequantize(f: GGUFFile, info: TensorInfo) -> np.ndarray:
    from gguf.quants import dequantize  # upstream block formats (Q8_0, Q6_K, ...), load time only
    m, k = info.np_shape
    return dequantize(f.raw(info.name), int(info.type_id)).reshape(m, k).astype(np.float32)


def load_linear(f: GGUFFile, name: str, m: int, k: int, tiling: dict[tuple[int, int], TL2Tile],
                repacked: RepackCache | None = None, arena=None):
    """One weight matrix; `repacked` supplies (and collects) TL2 tensors already repacked to I2_S, and tensors
    in the base-3 layout (hosts with kernels.b3_simd.HAVE_B3); arena() -> the B3Arena that new ones go to."""
    info = f.info(name)
    if info.np_shape != (m, k):
        raise GGUFError(f"{f.path}: tensor {name} has shape {list(info.np_shape)}, expected [{m}, {k}]")
    t = info.type_id
    if t in (GGMLType.I2_S, GGMLType.TL2, GGMLType.TQ1_0, GGMLType.TQ2_0) and k % I2S_BLOCK:
        raise GGUFError(f"{f.path}: ternary tensor {name} needs K % {I2S_BLOCK} == 0, has K = {k}")
    raw = f.raw(name)
    if t in (GGMLType.I2_S, GGMLType.TL2):
        cached = cached_b3(name, m, k, repacked)
        scale = i2s_scale(raw, m, k) if t == GGMLType.I2_S else tl2_scale(raw, m, k)
        floor, source = (I2S_ACT_FLOOR, "I2_S") if t == GGMLType.I2_S else (TL2_ACT_FLOOR, "TL2")
        if cached is not None:
            return TernaryWeight(m, k, cached, scale, None, floor, source, "b3")
    if t == GGMLType.I2_S:
        w = TernaryWeight(m, k, raw[:m * k // 4], scale, None, floor, source)
        return to_b3(f, name, w, raw, repacked, arena and arena()) if use_b3(m, k) else w
    if t == GGMLType.TL2:
        cached = repacked.get(name, m * k // 4) if repacked is not None else None
        if cached is not None:
            return TernaryWeight(m, k, cached, scale, None, floor, source)
        packed, scale = tl2_to_i2s(raw, m, k, tiling[(m, k)])
        f.release(raw)  # only the repacked copy is used from here on
        w = TernaryWeight(m, k, packed, scale, None, floor, source)
        if use_b3(m, k):
            b3 = to_b3(f, name, w, None, repacked, arena and arena())
            if b3 is not w:
                return b3
        if repacked is not None:
            repacked.put(name, packed)
        return w
    if t in (GGMLType.TQ1_0, GGMLType.TQ2_0):
        n_scales = m * (k // TQ_BLOCK)
        cached = repacked.get(name, m * k // 4) if repacked is not None else None
        cached_scales = repacked.get(name + TQ_SCALES_SUFFIX, 4 * n_scales) if cached is not None else None
        if cached_scales is not None:
            return TernaryWeight(m, k, cached, np.float32(1.0), cached_scales.view(np.float32).reshape(m, -1), 0.0,
                                 info.type_name)
        packed = np.empty(m * k // 4, np.uint8)
        if t == GGMLType.TQ2_0:  # byte by byte through a table, no int8 copy of the matrix
            scale_bits = np.empty(n_scales, np.uint16)
            tq2_0_to_i2s_packed(raw, n_scales, packed, scale_bits)
            block_scales = scale_bits.view(np.float16).astype(np.float32).reshape(m, k // TQ_BLOCK)
        else:
            w, block_scales = unpack_tq1_0(raw, m, k)
            pack_i2s(np.ascontiguousarray(w), packed)
        f.release(raw)  # only the repacked copy is used from here on
        block_scales = np.ascontiguousarray(block_scales, dtype=np.float32)
        if repacked is not None:
            repacked.put(name, packed)
            repacked.put(name + TQ_SCALES_SUFFIX, block_scales.reshape(-1).view(np.uint8))
        return TernaryWeight(m, k, read_only(packed), np.float32(1.0), read_only(block_scales), 0.0,
                             info.type_name)
    if t == GGMLType.F32:
        return DenseWeight(m, k, f.array(name), None, "F32")
    if t == GGMLType.F16:
        return DenseWeight(m, k, None, f.raw(name).view(np.uint16).reshape(m, k), "F16")
    if t == GGMLType.BF16:
        bits = f.array(name).astype(np.uint32) << 16
        return DenseWeight(m, k, bits.view(np.float32), None, "BF16")
    if t in DEQUANT_TYPES:
        return DenseWeight(m, k, _dequantize(f, info), None, info.type_name)
    raise GGUFError(f"{f.path}: tensor {name} has unsupported type {info.type_name}")


def load_weights(f: GGUFFile, cfg: ModelConfig, tiling: dict[tuple[int, int], TL2Tile],
                 quantize_head: bool = False) -> ModelWeights:
    """All weights of the model. TL2 and TQ1_0/TQ2_0 tensors come from the repack cache (bitnet_py.repack_cache)
    when it holds this file; otherwise they are repacked and the cache is written. quantize_head: also the int8
    copy of an f16 head (`screen`), kept in the same cache."""
    E, F, Q, KV = cfg.n_embd, cfg.n_ff, cfg.q_dim, cfg.kv_dim
    repacks = bool(tiling) or any(t.type_id in (GGMLType.TQ1_0, GGMLType.TQ2_0) for t in f.tensors.values())
    b3 = b3_enabled() and any(t.type_id in (GGMLType.I2_S, GGMLType.TL2) for t in f.tensors.values())
    cached = (repacks or quantize_head or b3) and cache_enabled()
    unwanted = () if quantize_head else SCREEN_CACHE_SUFFIXES  # a screened head's copy cached by an earlier load
    repacked = (RepackCache(f.path, tiling, anonymous=not f.mapped, unwanted=unwanted, b3=b3)
                if cached else None)

    arenas: list[B3Arena] = []

    def arena() -> B3Arena:
        if not arenas:
            arenas.append(B3Arena(B3Arena.size(f)))
        return arenas[0]

    def linear(name: str, m: int, k: int):
        return load_linear(f, name, m, k, tiling, repacked, arena)

    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        sub = cfg.traits.sub_norms
        layers.append(LayerWeights(
            attn_norm=_float_vector(f, p + "attn_norm.weight", E),
            wq=linear(p + "attn_q.weight", Q, E),
            wk=linear(p + "attn_k.weight", KV, E),
            wv=linear(p + "attn_v.weight", KV, E),
            wo=linear(p + "attn_output.weight", E, Q),
            attn_sub_norm=_float_vector(f, p + "attn_sub_norm.weight", Q) if sub else None,
            ffn_norm=_float_vector(f, p + "ffn_norm.weight", E),
            w_gate=linear(p + "ffn_gate.weight", F, E),
            w_up=linear(p + "ffn_up.weight", F, E),
            w_down=linear(p + "ffn_down.weight", E, F),
            ffn_sub_norm=_float_vector(f, p + "ffn_sub_norm.weight", F) if sub else None,
        ))
    embd = f.info("token_embd.weight")
    if embd.np_shape != (cfg.n_vocab, E):
        raise GGUFError(f"{f.path}: token_embd.weight has shape {list(embd.np_shape)}, expected "
                        f"[{cfg.n_vocab}, {E}]")
    head_name = head_tensor(f)
    output = linear(head_name, cfg.n_vocab, E)
    if not isinstance(output, DenseWeight):
        raise GGUFError(f"{f.path}: ternary output heads are not supported ({head_name} is "
                        f"{f.info(head_name).type_name})")
    screen = quantized_head(f, output, repacked) if quantize_head and output.f16_bits is not None else None
    tl2_source = "" if not tiling else "repack cache" if repacked is not None and repacked.hit else "decoded"
    if repacked is not None:
        repacked.save()
    return ModelWeights(embd, layers, _float_vector(f, "output_norm.weight", E), output, tl2_source, screen,
                        None if repacked is None else repacked.file_map, [] if repacked is None else repacked.skip)


def head_tensor(f: GGUFFile) -> str:
    """The output head's tensor: output.weight, or the tied token embedding."""
    return "output.weight" if "output.weight" in f.tensors else "token_embd.weight"


def sparse_tensors(f: GGUFFile, quantize_head: bool) -> set[str]:
    """Tensors a forward reads a few rows of, or none, not worth a copy in anonymous memory (no_mmap, a promotion):
    the token embedding, an f16 head that gets an int8 copy (the screened or int8 head; not a head streamed
    whole), and the ternary tensors that are repacked (read once at load, from the file map; I2_S ones too where
    they go to the base-3 layout)."""
    head = head_tensor(f)
    streamed = set() if quantize_head and f.info(head).type_id == GGMLType.F16 else {head}
    repacked = {name for name, t in f.tensors.items() if t.type_id in REPACKED_TYPES
                or t.type_id == GGMLType.I2_S and len(t.np_shape) == 2 and use_b3(*t.np_shape)}
    return ({"token_embd.weight", head} - streamed) | repacked


def quantized_head(f: GGUFFile, w: DenseWeight, repacked: RepackCache | None) -> ScreenedHead:
    """The f16 head's int8 copy with its error terms (bitnet_py.screened_head), from the repack cache or built in
    row chunks whose f16 pages are then released from this process's resident set (they stay in the page cache;
    the rows a step reads exactly, and tied embedding rows, fault back in on use); an anonymous copy (no_mmap)
    keeps them, as the embedding and the exact rows read them."""
    def release(lo: int, hi: int) -> None:
        f.release(w.f16_bits[lo:hi], read_again=True)

    name = head_tensor(f)
    if repacked is None:
        return quantize_head(w.f16_bits, release)
    return cached_head(repacked.get, repacked.put, name, w.f16_bits, release)


def int8_head(w: DenseWeight, head: ScreenedHead) -> DenseWeight:
    """The optional approximate head (head_type="int8"): the int8 codes and row scales alone, half the bytes per
    decoded token, not bit-exact with bitnet.cpp."""
    return DenseWeight(w.m, w.k, None, None, "I8(F16)", head.q, head.row_scales)


def embedding_rows(f: GGUFFile, info: TensorInfo, ids: np.ndarray) -> np.ndarray:
    """ids: i32[T] -> f32[T, E] (f16 rows widened exactly)."""
    n_vocab, e = info.np_shape
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        raise ValueError(f"token id out of range [0, {n_vocab})")
    rows = f.read_rows(info.name, ids)  # u8[T, row bytes], read from the file (not kept in the resident set)
    if info.type_id == GGMLType.F32:
        return rows.view("<f4").reshape(len(ids), e)
    if info.type_id == GGMLType.F16:
        return rows.view("<f2").reshape(len(ids), e).astype(np.float32)
    if info.type_id == GGMLType.BF16:
        return (rows.view("<u2").reshape(len(ids), e).astype(np.uint32) << 16).view(np.float32)
    if info.type_id in DEQUANT_TYPES:
        from gguf.quants import dequantize
        return dequantize(rows, int(info.type_id)).reshape(len(ids), e).astype(np.float32)
    raise GGUFError(f"token_embd.weight has unsupported type {info.type_name}")
