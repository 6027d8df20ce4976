"""TL2 tiling: (BM, BK) per weight shape (M outputs x K inputs).

TL2 bytes can only be decoded with the tiling they were packed with, and bitnet.cpp does not store it in the
GGUF: it lives in `include/kernel_config.ini`, written by `utils/codegen_tl2.py` with the BM/BK lists that
`setup_env.py` passes per model. We know those presets, parse kernel_config.ini files, and read the tiling
our own converter records in the GGUF (Keys.TL2_TILING).
"""
from __future__ import annotations

import configparser
import os
from dataclasses import dataclass

import numpy as np

from .constants import Keys


@dataclass(frozen=True)
class TL2Tile:
    m: int  # rows (outputs)
    k: int  # columns (inputs)
    bm: int
    bk: int
    bmm: int = 32


def _tiles(shapes: list[tuple[int, int]], bms: list[int], bk: int = 96) -> dict[tuple[int, int], TL2Tile]:
    return {(m, k): TL2Tile(m, k, bm, bk) for (m, k), bm in zip(shapes, bms)}


# Presets: the (M, K) shapes of codegen_tl2.py's model table with the BM/BK lists of setup_env.py
# (x86, TL2). BitNet-b1.58-2B-4T's entries are those of the kernel_config.ini shipped in ../shared/fixtures.
PRESETS: dict[str, dict[tuple[int, int], TL2Tile]] = {
    "bitnet_b1_58-large": {
        (1536, 4096): TL2Tile(1536, 4096, 256, 96),
        (1536, 1536): TL2Tile(1536, 1536, 128, 192),
        (4096, 1536): TL2Tile(4096, 1536, 256, 96),
    },
    "bitnet_b1_58-3B": _tiles([(3200, 8640), (3200, 3200), (8640, 3200)], [160, 320, 320]),
    "Llama3-8B-1.58-100B-tokens": _tiles([(14336, 4096), (4096, 14336), (1024, 4096), (4096, 4096)],
                                         [256, 128, 256, 128]),
    "BitNet-b1.58-2B-4T": _tiles([(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)], [256, 160, 256, 256]),
}


def default_tile(m: int, k: int) -> TL2Tile:
    """Tiling our own converter uses for shapes no preset covers: the largest BM in (256, 160, 128, 64, 32)
    dividing M, BK = 96."""
    for bm in (256, 160, 128, 64, 32):
        if m % bm == 0:
            return TL2Tile(m, k, bm, 96)
    raise ValueError(f"TL2 needs M divisible by 32, got M={m}")


def tile_for_writing(m: int, k: int, config_tiles: dict[tuple[int, int], TL2Tile]) -> TL2Tile:
    """The tiling a writer (converter, dummy generator) uses for an m x k weight: the user's kernel_config
    entry, else the first setup_env.py preset that has the shape, else `default_tile`."""
    if (m, k) in config_tiles:
        return config_tiles[(m, k)]
    for preset in PRESETS.values():
        if (m, k) in preset:
            return preset[(m, k)]
    return default_tile(m, k)


def parse_kernel_config(path: str | os.PathLike) -> dict[tuple[int, int], TL2Tile]:
    """Parse bitnet.cpp's kernel_config.ini ([Kernels_i] m, k, bm, bk, bmm)."""
    cp = configparser.ConfigParser()
    if not cp.read(os.fspath(path)):
        raise FileNotFoundError(f"TL2 kernel config not found: {path}")
    tiles = {}
    for section in cp.sections():
        s = cp[section]
        try:
            t = TL2Tile(int(s["m"]), int(s["k"]), int(s["bm"]), int(s["bk"]), int(s.get("bmm", "32")))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: section [{section}] is not a TL2 kernel entry ({e})") from None
        tiles[(t.m, t.k)] = t
    return tiles


def tiling_to_metadata(tiles: dict[tuple[int, int], TL2Tile]) -> np.ndarray:
    """Flattened [m, k, bm, bk] rows for Keys.TL2_TILING."""
    return np.array([[t.m, t.k, t.bm, t.bk] for t in tiles.values()], dtype=np.uint32).reshape(-1)


def tiling_from_metadata(value) -> dict[tuple[int, int], TL2Tile]:
    arr = np.asarray(value, dtype=np.int64).reshape(-1, 4)
    return {(int(m), int(k)): TL2Tile(int(m), int(k), int(bm), int(bk)) for m, k, bm, bk in arr}


def find_kernel_config(model_path: str | os.PathLike) -> str | None:
    """A kernel_config.ini (or kernel_config_tl2.ini / tl2-kernel_config.ini) beside the model file."""
    d = os.path.dirname(os.path.abspath(model_path))
    for name in ("kernel_config.ini", "kernel_config_tl2.ini", "tl2-kernel_config.ini"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    parent = os.path.dirname(d)
    p = os.path.join(parent, "tl2-kernel_config.ini")
    return p if os.path.isfile(p) else None


def resolve_tiling(shapes: set[tuple[int, int]], metadata: dict, model_path: str,
                   config_path: str | None = None) -> dict[tuple[int, int], TL2Tile]:
    """Tiling for every TL2 weight shape, from (in order): an explicit kernel_config.ini, the GGUF's own
    record, a kernel_config.ini beside the model, the presets. Raises ValueError naming what to pass."""
    sources: list[tuple[str, dict]] = []
    if config_path:
        sources.append((config_path, parse_kernel_config(config_path)))
    if Keys.TL2_TILING in metadata:
        sources.append(("GGUF metadata", tiling_from_metadata(metadata[Keys.TL2_TILING])))
    if not config_path:
        found = find_kernel_config(model_path)
        if found:
            sources.append((found, parse_kernel_config(found)))
    for name, preset in PRESETS.items():
        sources.append((f"preset {name}", preset))
    out = {}
    for shape in shapes:
        for _, tiles in sources:
            if shape in tiles:
                out[shape] = tiles[shape]
                break
        else:
            raise ValueError(
                f"TL2 tiling for weight shape M={shape[0]} x K={shape[1]} is unknown: bitnet.cpp does not store "
                f"it in the GGUF. Pass the kernel_config.ini that bitnet.cpp generated for this model "
                f"(--tl2-config PATH, from bitnet.cpp's include/kernel_config.ini) or put it beside the model file.")
    return out
