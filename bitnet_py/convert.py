"""Hugging Face checkpoint -> GGUF, producing what bitnet.cpp's converter (+ llama-quantize for I2_S) produces.

    python -m bitnet_py.convert HF_DIR --outtype {i2_s,tl2,tq2_0,f32} -o out.gguf [--tl2-config kernel_config.ini]
    convert(hf_dir, outtype, out_path, tl2_config=None, progress=True)

Streams tensor by tensor (safetensors are memory-mapped; one tensor's float32 copy at a time), so a 7B model
converts in a few GB of RAM. Architectures and name mapping: `convert_arch`; tokenizer keys: `convert_vocab`.

Ternary weights (q, k, v, o, gate, up, down): first the float32 tensor bitnet.cpp's converter writes to its f32 file
(latent weights: `clamp(round(W*s),-1,1)/s` with torch's mean; packed uint8 + `weight_scale`: `codes / weight_scale`;
llama checkpoints: the weights as stored, which must already be {-a, 0, a}), q/k rows permuted for llama; then for
i2_s / tl2 / tq2_0 llama-quantize's rule: scale = max|W|, code = sign(W) (0 where |W| < 1e-6). Embeddings and the
output head are F32 in f32 files, F16 otherwise; norms stay F32.

Differences from bitnet.cpp's files (tests check everything else byte for byte):
- I2_S: the 28 bytes after each tensor's scale are zero here (undefined leftovers in bitnet.cpp's files).
- TL2 files carry `bitnet_py.tl2.tiling` (the BM/BK used, absent in bitnet.cpp's files, which rely on the
  kernel_config.ini of the build); the tiling is the --tl2-config's when it has the shape, else bitnet.cpp's preset
  for that shape, else `default_tile`.
- `general.name` is the model directory's name (the parent's when the directory is called `hf`) unless given.
- Outtype tq2_0 (upstream ggml TQ2_0, file_type 37) and arch `bitnet-b1.58` have no bitnet.cpp counterpart in the
  fixtures; `bitnet-b1.58` files also carry `rope.dimension_count` and `tokenizer.ggml.eot_token_id`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from .convert_arch import (TERNARY_KINDS, ArchSpec, HParams, arch_metadata, gguf_name, hparams, kind_of,
                           load_config, permute_qk, unpack_hf_ternary)
from .convert_safetensors import Checkpoint
from .convert_vocab import tokenizer_metadata
from .gguf.constants import (FTYPE_ALL_F32, FTYPE_MOSTLY_I2_S, FTYPE_MOSTLY_TL2, FTYPE_MOSTLY_TQ2_0, GGMLType,
                             GGUFValueType, Keys)
from .gguf.ternary_pack import (DEFAULT_TORCH_THREADS, absmean_dequant, pack_i2s, pack_tl2, pack_tq2_0,
                                quantize_i2s_rule)
from .gguf.tl2_tiling import TL2Tile, parse_kernel_config, tile_for_writing, tiling_to_metadata
from .gguf.writer import GGUFWriter, counted_parts

log = logging.getLogger(__name__)

OUTTYPES = {  # outtype -> (ternary tensor type, float matrix type, general.file_type)
    "f32": (GGMLType.F32, GGMLType.F32, FTYPE_ALL_F32),
    "i2_s": (GGMLType.I2_S, GGMLType.F16, FTYPE_MOSTLY_I2_S),
    "tl2": (GGMLType.TL2, GGMLType.F16, FTYPE_MOSTLY_TL2),
    "tq2_0": (GGMLType.TQ2_0, GGMLType.F16, FTYPE_MOSTLY_TQ2_0),
}
QUANT_VERSION = 2


def default_name(hf_dir: str) -> str:
    d = os.path.basename(os.path.normpath(os.path.abspath(hf_dir)))
    if d == "hf":
        d = os.path.basename(os.path.dirname(os.path.normpath(os.path.abspath(hf_dir))))
    return d


def _rows(kind: str, hp: HParams) -> int:
    return {"attn_q": hp.n_head * hp.head_dim, "attn_k": hp.n_head_kv * hp.head_dim,
            "attn_v": hp.n_head_kv * hp.head_dim, "attn_output": hp.n_embd, "ffn_gate": hp.n_ff,
            "ffn_up": hp.n_ff, "ffn_down": hp.n_embd}[kind]


def _check_ternary_shape(name: str, m: int, k: int, ttype: int, tile: TL2Tile | None) -> None:
    if ttype == GGMLType.I2_S and k % 128:
        raise ValueError(f"{name}: I2_S needs the row length K={k} to be a multiple of 128")
    if ttype == GGMLType.TQ2_0 and k % 256:
        raise ValueError(f"{name}: TQ2_0 needs the row length K={k} to be a multiple of 256")
    if ttype == GGMLType.TL2:
        two_k = k - k // tile.bk * tile.bk
        if m % tile.bm or tile.bm % 32 or tile.bk % 24 or two_k % 32:
            raise ValueError(f"{name}: TL2 tiling BM={tile.bm}, BK={tile.bk} does not fit the {m}x{k} weight")


class _Plan:
    """What to write: (hf name, gguf name, numpy shape, ggml type, tl2 tile) in checkpoint order."""

    def __init__(self, ckpt: Checkpoint, spec: ArchSpec, hp: HParams, outtype: str, config_tiles: dict):
        ttype, ftype, _ = OUTTYPES[outtype]
        self.items = []
        self.tiles: dict[tuple[int, int], TL2Tile] = {}
        for hf in ckpt.names():
            g = gguf_name(hf)
            if g is None:
                continue
            info, kind = ckpt.info(hf), kind_of(g)
            shape = info.shape
            tile = None
            if kind in TERNARY_KINDS:
                if info.dtype == "U8":
                    shape = (_rows(kind, hp), shape[1])
                    if hf[:-len("weight")] + "weight_scale" not in ckpt:
                        raise ValueError(f"{hf}: packed uint8 weight without its weight_scale tensor")
                if len(shape) != 2:
                    raise ValueError(f"{hf}: expected a 2-D weight, got shape {shape}")
                typ = ttype
                if typ == GGMLType.TL2:
                    tile = tile_for_writing(shape[0], shape[1], config_tiles)
                    self.tiles[(shape[0], shape[1])] = tile
                _check_ternary_shape(hf, shape[0], shape[1], typ, tile)
            elif len(shape) == 2:
                typ = ftype  # token_embd, output
            else:
                typ = GGMLType.F32  # norms
            self.items.append((hf, g, tuple(shape), typ, tile))
        names = {g for _, g, _, _, _ in self.items}
        if "token_embd.weight" not in names:
            raise ValueError("checkpoint has no model.embed_tokens.weight")


def _ternary_f32(ckpt: Checkpoint, hf: str, g: str, spec: ArchSpec, hp: HParams, rows: int,
                 check_ternary: bool, threads: int) -> np.ndarray:
    """The float32 weight bitnet.cpp's converter writes to an f32 file."""
    info = ckpt.info(hf)
    if info.dtype == "U8":
        scale = ckpt.load_f32(hf[:-len("weight")] + "weight_scale").reshape(-1)
        if scale.size != 1 and not np.all(scale == scale[0]):
            raise ValueError(f"{hf}: per-channel weight_scale is not supported (one scale per tensor)")
        w = unpack_hf_ternary(ckpt.raw(hf), rows).astype(np.float32) / scale[0]
    elif spec.absmean:
        w = absmean_dequant(ckpt.load_f32(hf), threads)
    else:
        w = ckpt.load_f32(hf)
        if check_ternary:
            mags = np.unique(np.abs(w))
            if mags.size > 2 or (mags.size == 2 and mags[0] != 0):
                raise ValueError(f"{hf}: weights are not ternary ({mags.size} distinct magnitudes); a "
                                 f"{spec.hf_name} checkpoint must hold {{-a, 0, a}} or packed ternary weights")
    kind = kind_of(g)
    if spec.permute_qk and kind in ("attn_q", "attn_k"):
        w = permute_qk(w, hp.n_head if kind == "attn_q" else hp.n_head_kv)
    return w


_ROWS_PER_CHUNK = 8192


def _tensor_parts(ckpt, item, spec, hp, threads):
    """The tensor's data region as consecutive pieces (float matrices in row chunks, so a 128K-row embedding
    never exists as a whole float32 copy)."""
    hf, g, shape, typ, tile = item
    if kind_of(g) not in TERNARY_KINDS:
        for r in range(0, shape[0], _ROWS_PER_CHUNK):
            a = ckpt.load_f32(hf, r, r + _ROWS_PER_CHUNK)
            yield a.astype(np.float16) if typ == GGMLType.F16 else a
        return
    w = _ternary_f32(ckpt, hf, g, spec, hp, shape[0], typ != GGMLType.F32, threads)
    if typ == GGMLType.F32:
        yield w
        return
    codes, scale = quantize_i2s_rule(w)
    del w
    if typ == GGMLType.I2_S:
        yield pack_i2s(codes, scale)
    elif typ == GGMLType.TL2:
        yield pack_tl2(codes, scale, tile)
    else:
        yield pack_tq2_0(codes, scale)


def convert(hf_dir: str, outtype: str, out_path: str | None = None, tl2_config: str | None = None,
            progress: bool = True, name: str | None = None, torch_threads: int = DEFAULT_TORCH_THREADS) -> str:
    """Convert a HF model directory to GGUF; returns the output path. `torch_threads` is the torch thread count
    bitnet.cpp's converter ran with (it decides the last ulp of absmean scales; the fixtures used 2)."""
    hf_dir = os.fspath(hf_dir)
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    config, spec = load_config(hf_dir)
    hp = hparams(config)
    out_path = os.fspath(out_path) if out_path else os.path.join(hf_dir, f"ggml-model-{outtype}.gguf")
    config_tiles = parse_kernel_config(tl2_config) if tl2_config else {}
    meta = arch_metadata(spec, hp, name or default_name(hf_dir), OUTTYPES[outtype][2])
    meta.update(tokenizer_metadata(hf_dir, config, hp.n_vocab))
    with Checkpoint(hf_dir) as ckpt:
        plan = _Plan(ckpt, spec, hp, outtype, config_tiles)
        log.info("converting %s (%s -> %s, %d tensors) to %s", hf_dir, spec.hf_name, spec.gguf_arch,
                 len(plan.items), out_path)
        with GGUFWriter(out_path) as w:
            for k, v in meta.items():
                w.add(k, v)
            if outtype in ("i2_s", "tq2_0"):
                w.add(Keys.QUANT_VERSION, QUANT_VERSION)
            if plan.tiles:
                w.add(Keys.TL2_TILING, tiling_to_metadata(plan.tiles), GGUFValueType.ARRAY, GGUFValueType.UINT32)
            total = sum(w.add_tensor_info(g, shape, typ) for _, g, shape, typ, _ in plan.items)
            w.write_header()
            bar = _progress(total, progress)
            for item in plan.items:
                if bar is not None:
                    bar.set_postfix_str(item[1], refresh=False)
                w.write_tensor_parts(item[1], counted_parts(_tensor_parts(ckpt, item, spec, hp, torch_threads), bar))
            if bar is not None:
                bar.close()
    return out_path



def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="convert")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitnet_py.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--outtype", choices=sorted(OUTTYPES), default="i2_s")
    p.add_argument("-o", "--outfile", help="output GGUF path (default HF_DIR/ggml-model-OUTTYPE.gguf)")
    p.add_argument("--tl2-config", help="bitnet.cpp kernel_config.ini with the TL2 tiling (BM, BK) per shape")
    p.add_argument("--name", help="general.name (default: the model directory's name)")
    p.add_argument("--torch-threads", type=int, default=DEFAULT_TORCH_THREADS,
                   help="torch thread count to emulate in the absmean mean (last-ulp compatibility)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert(args.hf_dir, args.outtype, args.outfile, args.tl2_config, not args.no_progress,
                      args.name, args.torch_threads)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
