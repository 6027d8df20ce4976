#!/usr/bin/env python
"""Attention kernels side by side at the 2B-4T shapes (20 query heads, 5 KV heads of 128, f16 cache):

    python scripts/bench_attention.py [-t 2] [-r 5] [--cases prefill128,decode512,decode4096,batch8x4096]
        [--layer-caches] [--against REV]

Prints a markdown table of the median ms for 30 layers (one call per layer) for the plain kernel
(kernels/attention.py, the baseline), attention_fast (one task per token tile and KV head), the split kernel
(kernels/attention_split.py) and `auto` (what the model runs), and each one's speed-up over the baseline.
Outputs are checked first: fast == split bit for bit, both close to the plain kernel. By default the 30 calls
share one cache, small enough to sit in L3 here, so decode numbers are a lower bound for a real model;
`--layer-caches` gives every layer its own cache, as the model has (decode then streams K/V from memory).
`--against REV` also times the fast, split and auto kernels of git revision REV in the same process, rounds
interleaved with the working tree's (a copy of REV's kernels/ imported as a second package).
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))  # bench_ab's packages_at, also when loaded from a file path

H, KVH, D, BLOCK = 20, 5, 128, 16
CASES = {  # name -> (tokens per sequence, sequences, context length)
    "prefill128": (128, 1, 128),
    "prefill128d4096": (128, 1, 4096),
    "decode128": (1, 1, 128),
    "decode256": (1, 1, 256),
    "decode512": (1, 1, 512),
    "decode1000": (1, 1, 1000),
    "decode2000": (1, 1, 2000),
    "decode4096": (1, 1, 4096),
    "batch2x4096": (1, 2, 4096),
    "batch4x4096": (1, 4, 4096),
    "batch8x4096": (1, 8, 4096),
}


N_LAYERS = 30


def _cache(rng, n_slots: int) -> np.ndarray:
    """u16[KVH, n_slots, D] float16 bits of random values, in memory like the model's KV cache (huge pages)."""
    from bitnet_py import huge_pages
    out = huge_pages.zeros((KVH, n_slots, D), np.uint16)
    out[...] = rng.standard_normal((KVH, n_slots, D)).astype(np.float16).view(np.uint16)
    return out


def _slots_first(cache: np.ndarray) -> np.ndarray:
    """The same cache as u16[n_slots, KVH, D], the layout of revisions before kernels.attention.CACHE_LAYOUT."""
    from bitnet_py import huge_pages
    out = huge_pages.zeros((cache.shape[1], cache.shape[0], cache.shape[2]), cache.dtype)
    out[...] = cache.transpose(1, 0, 2)
    return out


def make_case(per_seq: int, n_seq: int, n_ctx: int, rng, n_caches: int = 1):
    """-> q, k, v (lists of n_caches float16 caches), positions, sequence index, block tables, round_probs."""
    blocks = (n_ctx + BLOCK - 1) // BLOCK
    k = [_cache(rng, n_seq * blocks * BLOCK) for _ in range(n_caches)]
    v = [_cache(rng, n_seq * blocks * BLOCK) for _ in range(n_caches)]
    tables = np.arange(n_seq * blocks, dtype=np.int32).reshape(n_seq, blocks)
    pos = np.concatenate([np.arange(n_ctx - per_seq, n_ctx) for _ in range(n_seq)]).astype(np.int32)
    seq = np.repeat(np.arange(n_seq), per_seq).astype(np.int32)
    q = rng.standard_normal((len(pos), H, D)).astype(np.float16).astype(np.float32)
    round_probs = np.full(n_seq, per_seq == 1)
    return q, k, v, pos, seq, tables, round_probs


def kernels_at(rev: str) -> dict:
    """fast, split and auto attention of git revision `rev`, from its kernels/ imported as `kernels_<rev>` beside
    the working tree's (scripts/bench_ab.py's `packages_at`), and whether they read caches [n_slots, KVH, D]."""
    from bench_ab import packages_at
    pkg = "kernels" + packages_at(rev, ("kernels",))
    fast = importlib.import_module(pkg + ".attention_fast")
    split = importlib.import_module(pkg + ".attention_split")
    layout = getattr(importlib.import_module(pkg + ".attention"), "CACHE_LAYOUT", "slots_first")
    return {f"fast@{rev}": fast.paged_attention_fast, f"split@{rev}": split.paged_attention_split_g4,
            f"auto@{rev}": split.paged_attention_auto}, layout == "slots_first"


def main(argv=None) -> int:
    import numba

    from kernels.attention import paged_attention
    from kernels.attention_fast import paged_attention_fast
    from kernels.attention_split import paged_attention_auto, paged_attention_split_g4
    from kernels.f16 import f16_lut
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-t", "--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--layer-caches", action="store_true", help="each of the 30 layers reads its own cache")
    p.add_argument("--against", metavar="REV", help="also time the kernels of this git revision")
    a = p.parse_args(argv)
    numba.set_num_threads(a.threads)
    other, other_slots_first = kernels_at(a.against) if a.against else ({}, False)
    rng = np.random.default_rng(0)
    lut, scale = f16_lut(), np.float32(1 / np.sqrt(D))
    e32 = np.zeros((KVH, 0, D), np.float32)
    caches = N_LAYERS if a.layer_caches else 1
    print(f"threads {a.threads}, load avg {os.getloadavg()[0]:.1f}; ms per {N_LAYERS} layers (median of "
          f"{a.repetitions}), {'one cache per layer' if caches > 1 else 'one cache for all layers'}\n")
    names = ["fast", "split", "auto"] + list(other)
    print("| case | plain (baseline) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for name in a.cases.split(","):
        q, k, v, pos, seq, tables, rp = make_case(*CASES[name], rng, caches)
        k_old, v_old = ([_slots_first(c) for c in k], [_slots_first(c) for c in v]) if other_slots_first else (k, v)
        kernels = {"plain": paged_attention, "fast": paged_attention_fast, "split": paged_attention_split_g4,
                   "auto": paged_attention_auto, **other}

        layouts = {kname: (k_old, v_old) if kname in other else (k, v) for kname in kernels}  # each kernel's caches

        def call(kname, layer, out):
            kc, vc = layouts[kname]
            kernels[kname](q, kc[layer % caches], vc[layer % caches], e32, e32, False, pos, seq, tables, BLOCK, rp,
                           scale, lut, out)

        outs = {}
        for kname in kernels:
            outs[kname] = np.empty_like(q)
            call(kname, 0, outs[kname])  # compile + check
        if not np.array_equal(outs["fast"], outs["split"]):
            raise SystemExit(f"{name}: split differs from fast")
        np.testing.assert_allclose(outs["fast"], outs["plain"], rtol=1e-4, atol=2e-3)
        changed = [kn for kn in other if not np.array_equal(outs[kn], outs["fast"])]
        times = {kname: [] for kname in kernels}
        for _ in range(a.repetitions):
            for kname in kernels:  # interleaved: host noise hits every kernel alike
                t0 = time.perf_counter()
                for layer in range(N_LAYERS):
                    call(kname, layer, outs[kname])
                times[kname].append(time.perf_counter() - t0)
        med = {kname: statistics.median(ts) * 1e3 for kname, ts in times.items()}
        cells = [f"{med['plain']:.1f}"] + [f"{med[kn]:.1f} ({med['plain'] / med[kn]:.1f}x)" for kn in names]
        print(f"| {name} | " + " | ".join(cells) + " |")
        if changed:
            print(f"\n{name}: {', '.join(changed)} give other outputs than this tree's fast kernel\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
