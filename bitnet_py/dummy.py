"""Random-weight GGUF models at real BitNet shapes, for benchmarks and load tests (no download needed).

    python -m bitnet_py.dummy --layout {2b-4t,2b-4t-upstream,bitnet-large,bitnet-3b,falcon3-1b,falcon3-7b,llama3-8b,tiny}
                              --type {i2_s,tl2,tq2_0,f16,f32} --seed S -o out.gguf
    make_dummy(layout, qtype, out_path, seed=0, progress=True, tl2_config=None)

Weights: random ternary codes (about 1/3 zeros) with one scale per tensor, `sqrt(1.5/K)` times U(0.8, 1.2), so
activations keep their size through a layer; norm gains `|1 + 0.1 N(0,1)|`; embeddings N(0, 0.02^2) (F16 except for
--type f32). Vocabulary: synthetic byte-level BPE with Llama-3 special tokens, or SentencePiece for the 1bitLLM
layouts (`dummy_vocab`). Streams one tensor at a time (large embeddings in row chunks); I2_S bytes are drawn
directly (random uint16 mapped onto the 81 valid 4-code bytes), so a 2B-4T i2_s file takes seconds.
Shapes the type cannot hold fail up front (I2_S needs K % 128 == 0, TQ2_0 K % 256 == 0: bitnet-3b's K=3200/8640).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import numpy as np

from .convert_arch import ARCHS, HParams, arch_metadata
from .dummy_vocab import BITNET_2B_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE, synthetic_bpe, synthetic_sentencepiece
from .gguf.constants import (FTYPE_ALL_F32, FTYPE_MOSTLY_F16, FTYPE_MOSTLY_I2_S, FTYPE_MOSTLY_TL2,
                             FTYPE_MOSTLY_TQ2_0, GGMLType, GGUFValueType, Keys)
from .gguf.ternary_pack import pack_tl2, pack_tq2_0
from .gguf.tl2_tiling import parse_kernel_config, tile_for_writing, tiling_to_metadata
from .gguf.writer import GGUFWriter, counted_parts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    hf_arch: str  # key of convert_arch.ARCHS
    hp: HParams
    tied: bool  # no output.weight: logits use token_embd
    vocab: str  # "bpe" or "spm"
    name: str


def _hp(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_ctx, theta, eps, head_dim=None) -> HParams:
    return HParams(n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim or n_embd // n_head, n_ctx, n_vocab,
                   theta, eps)


# Public configs: microsoft/BitNet-b1.58-2B-4T, 1bitLLM/bitnet_b1_58-{large,3B}, tiiuae/Falcon3-{1B,7B}-*-1.58bit,
# HF1BitLLM/Llama3-8B-1.58-100B-tokens.
LAYOUTS = {
    "2b-4t": Layout("BitNetForCausalLM", _hp(30, 2560, 6912, 20, 5, 128256, 4096, 500000.0, 1e-5), True, "bpe",
                    "bitnet-b1.58-2B-4T (random)"),
    # the same shapes under the `bitnet` arch (SiLU gate instead of squared ReLU): upstream llama.cpp has no
    # `bitnet-b1.58` arch, so this is the 2B-4T twin it can run (scripts/bench_vs_llama_cpp.py)
    "2b-4t-upstream": Layout("BitnetForCausalLM", _hp(30, 2560, 6912, 20, 5, 128256, 4096, 500000.0, 1e-5), True,
                             "bpe", "bitnet-b1.58-2B-4T shapes, bitnet arch (random)"),
    "bitnet-large": Layout("BitnetForCausalLM", _hp(24, 1536, 4096, 16, 16, 32002, 2048, 10000.0, 1e-5), True,
                           "spm", "bitnet_b1_58-large (random)"),
    "bitnet-3b": Layout("BitnetForCausalLM", _hp(26, 3200, 8640, 32, 32, 32002, 2048, 10000.0, 1e-5), True, "spm",
                        "bitnet_b1_58-3B (random)"),
    "falcon3-1b": Layout("LlamaForCausalLM", _hp(18, 2048, 8192, 8, 4, 131072, 8192, 1000042.0, 1e-6, 256), False,
                         "bpe", "Falcon3-1B-Instruct-1.58bit (random)"),
    "falcon3-7b": Layout("LlamaForCausalLM", _hp(28, 3072, 23040, 12, 4, 131072, 32768, 1000042.0, 1e-6, 256),
                         False, "bpe", "Falcon3-7B-Instruct-1.58bit (random)"),
    "llama3-8b": Layout("LlamaForCausalLM", _hp(32, 4096, 14336, 32, 8, 128256, 8192, 500000.0, 1e-5), False,
                        "bpe", "Llama3-8B-1.58-100B-tokens (random)"),
    "tiny": Layout("BitNetForCausalLM", _hp(2, 256, 768, 4, 1, 2048, 2048, 500000.0, 1e-5), True, "bpe",
                   "tiny-bitnet-b1.58 (random)"),
}
TYPES = {  # --type -> (ternary tensor type, embedding/output type, general.file_type)
    "i2_s": (GGMLType.I2_S, GGMLType.F16, FTYPE_MOSTLY_I2_S),
    "tl2": (GGMLType.TL2, GGMLType.F16, FTYPE_MOSTLY_TL2),
    "tq2_0": (GGMLType.TQ2_0, GGMLType.F16, FTYPE_MOSTLY_TQ2_0),
    "f16": (GGMLType.F16, GGMLType.F16, FTYPE_MOSTLY_F16),
    "f32": (GGMLType.F32, GGMLType.F32, FTYPE_ALL_F32),
}
_VALID_I2S_BYTES = np.array([(a << 6) | (b << 4) | (c << 2) | d for a in range(3) for b in range(3)
                             for c in range(3) for d in range(3)], dtype=np.uint8)
_U16_TO_I2S = _VALID_I2S_BYTES[np.arange(65536) % 81]  # bias < 1e-4 per byte value
_BYTE_TO_CODE = (np.arange(256) % 3 - 1).astype(np.int8)
_ROWS_PER_CHUNK = 4096


def tensor_plan(layout: Layout) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
    """(gguf name, numpy shape, role) in the converter's order; role: embd, norm, ternary."""
    hp = layout.hp
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    sub = ARCHS[layout.hf_arch].gguf_arch != "llama"
    plan: list = [] if layout.tied else [("output.weight", (hp.n_vocab, hp.n_embd), "embd")]
    plan.append(("token_embd.weight", (hp.n_vocab, hp.n_embd), "embd"))
    for i in range(hp.n_layer):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (hp.n_embd,), "norm"), (b + "ffn_down.weight", (hp.n_embd, hp.n_ff), "t")]
        plan += [(b + "ffn_sub_norm.weight", (hp.n_ff,), "norm")] if sub else []
        plan += [(b + "ffn_gate.weight", (hp.n_ff, hp.n_embd), "t"), (b + "ffn_up.weight", (hp.n_ff, hp.n_embd), "t"),
                 (b + "ffn_norm.weight", (hp.n_embd,), "norm")]
        plan += [(b + "attn_sub_norm.weight", (hp.n_embd,), "norm")] if sub else []
        plan += [(b + "attn_k.weight", (kv, hp.n_embd), "t"), (b + "attn_output.weight", (hp.n_embd, q), "t"),
                 (b + "attn_q.weight", (q, hp.n_embd), "t"), (b + "attn_v.weight", (kv, hp.n_embd), "t")]
    plan.append(("output_norm.weight", (hp.n_embd,), "norm"))
    return [(n, s, "ternary" if r == "t" else r) for n, s, r in plan]


def _check(name: str, shape, ttype: int, tile) -> None:
    m, k = shape
    if ttype == GGMLType.I2_S and k % 128:
        raise ValueError(f"{name}: I2_S needs K % 128 == 0 (K={k}); use --type tl2 or f16 for this layout")
    if ttype == GGMLType.TQ2_0 and k % 256:
        raise ValueError(f"{name}: TQ2_0 needs K % 256 == 0 (K={k}); use --type tl2 or f16 for this layout")
    if ttype == GGMLType.TL2 and (m % tile.bm or (k - k // tile.bk * tile.bk) % 32):
        raise ValueError(f"{name}: TL2 tiling BM={tile.bm}, BK={tile.bk} does not fit {m}x{k}")


def _ternary_parts(rng: np.random.Generator, shape, ttype: int, tile):
    m, k = shape
    scale = np.float32(np.sqrt(1.5 / k) * rng.uniform(0.8, 1.2))
    if ttype == GGMLType.I2_S:
        yield _U16_TO_I2S[np.frombuffer(rng.bytes(m * k // 2), dtype=np.uint16)]
        tail = np.zeros(32, np.uint8)
        tail[:4] = np.array([scale], "<f4").view(np.uint8)
        yield tail
        return
    codes = _BYTE_TO_CODE[np.frombuffer(rng.bytes(m * k), dtype=np.uint8)].reshape(m, k)
    if ttype == GGMLType.TL2:
        yield pack_tl2(codes, scale, tile)
    elif ttype == GGMLType.TQ2_0:
        yield pack_tq2_0(codes, scale)
    else:
        dtype = np.float16 if ttype == GGMLType.F16 else np.float32
        for r in range(0, m, _ROWS_PER_CHUNK):
            yield (codes[r:r + _ROWS_PER_CHUNK] * scale).astype(dtype)


def _float_parts(rng: np.random.Generator, shape, role: str, typ: int):
    dtype = np.float16 if typ == GGMLType.F16 else np.float32
    if role == "norm":
        yield np.abs(1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        return
    rows, cols = shape
    for r in range(0, rows, _ROWS_PER_CHUNK):
        n = min(_ROWS_PER_CHUNK, rows - r)
        yield (0.02 * rng.standard_normal((n, cols), dtype=np.float32)).astype(dtype)


def make_dummy(layout: str, qtype: str, out_path: str, seed: int = 0, progress: bool = True,
               tl2_config: str | None = None) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if qtype not in TYPES:
        raise ValueError(f"unknown type {qtype!r}; choose one of {', '.join(TYPES)}")
    lay = LAYOUTS[layout]
    ttype, etype, ftype = TYPES[qtype]
    spec = ARCHS[lay.hf_arch]
    config_tiles = parse_kernel_config(tl2_config) if tl2_config else {}
    plan, tiles = [], {}
    for name, shape, role in tensor_plan(lay):
        typ, tile = (GGMLType.F32, None) if role == "norm" else (etype, None)
        if role == "ternary":
            typ = ttype
            if typ == GGMLType.TL2:
                tile = tiles.setdefault(shape, tile_for_writing(*shape, config_tiles))
            _check(name, shape, typ, tile)
        plan.append((name, shape, role, typ, tile))
    meta = arch_metadata(spec, lay.hp, lay.name, ftype)
    if lay.vocab == "spm":
        meta.update(synthetic_sentencepiece(lay.hp.n_vocab, seed))
    else:
        template = LLAMA3_CHAT_TEMPLATE if spec.gguf_arch == "llama" else BITNET_2B_CHAT_TEMPLATE
        meta.update(synthetic_bpe(lay.hp.n_vocab, seed, template))
    rng = np.random.default_rng(seed)
    with GGUFWriter(out_path) as w:
        for k, v in meta.items():
            w.add(k, v)
        if qtype in ("i2_s", "tq2_0"):
            w.add(Keys.QUANT_VERSION, 2)
        if tiles:
            w.add(Keys.TL2_TILING, tiling_to_metadata(tiles), GGUFValueType.ARRAY, GGUFValueType.UINT32)
        total = sum(w.add_tensor_info(name, shape, typ) for name, shape, _, typ, _ in plan)
        w.write_header()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"dummy {layout} {qtype}")
        for name, shape, role, typ, tile in plan:
            parts = _ternary_parts(rng, shape, typ, tile) if role == "ternary" else _float_parts(rng, shape, role, typ)
            w.write_tensor_parts(name, counted_parts(parts, bar))
        if bar is not None:
            bar.close()
    log.info("wrote %s (%s, %s)", out_path, layout, qtype)
    return out_path



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitnet_py.dummy", description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=list(LAYOUTS), default="2b-4t")
    p.add_argument("--type", dest="qtype", choices=list(TYPES), default="i2_s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--outfile", required=True)
    p.add_argument("--tl2-config", help="kernel_config.ini whose TL2 tiling to use where it has the shape")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        make_dummy(args.layout, args.qtype, args.outfile, args.seed, not args.no_progress, args.tl2_config)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(args.outfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
