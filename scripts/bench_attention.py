#!/usr/bin/env python
"""Attention kernels side by side at the 2B-4T shapes (20 query heads, 5 KV heads of 128, f16 cache):

    python scripts/bench_attention.py [-t 2] [-r 5] [--cases prefill128,decode512,decode4096,batch8x4096]

Prints a markdown table of the median ms for 30 layers (one call per layer on the same cache) for the plain
kernel (kernels/attention.py, the baseline), attention_fast (one task per token and KV head), the split kernel
(kernels/attention_split.py) and `auto` (what the model runs), and each one's speed-up over the baseline.
Outputs are checked first: fast == split bit for bit, both close to the plain kernel. The cache is small enough
to sit in L3 here, so decode numbers are a lower bound for a real model, whose layers each read their own cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

H, KVH, D, BLOCK = 20, 5, 128, 16
CASES = {  # name -> (tokens per sequence, sequences, context length)
    "prefill128": (128, 1, 128),
    "prefill128d4096": (128, 1, 4096),
    "decode512": (1, 1, 512),
    "decode4096": (1, 1, 4096),
    "batch8x4096": (1, 8, 4096),
}


def make_case(per_seq: int, n_seq: int, n_ctx: int, rng):
    blocks = (n_ctx + BLOCK - 1) // BLOCK
    k = rng.standard_normal((n_seq * blocks * BLOCK, KVH, D)).astype(np.float16).view(np.uint16)
    v = rng.standard_normal((n_seq * blocks * BLOCK, KVH, D)).astype(np.float16).view(np.uint16)
    tables = np.arange(n_seq * blocks, dtype=np.int32).reshape(n_seq, blocks)
    pos = np.concatenate([np.arange(n_ctx - per_seq, n_ctx) for _ in range(n_seq)]).astype(np.int32)
    seq = np.repeat(np.arange(n_seq), per_seq).astype(np.int32)
    q = rng.standard_normal((len(pos), H, D)).astype(np.float16).astype(np.float32)
    round_probs = np.full(n_seq, per_seq == 1)
    return q, k, v, pos, seq, tables, round_probs


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
    a = p.parse_args(argv)
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    lut, scale = f16_lut(), np.float32(1 / np.sqrt(D))
    e32 = np.zeros((0, KVH, D), np.float32)
    print(f"threads {a.threads}, load avg {os.getloadavg()[0]:.1f}; ms per 30 layers (median of {a.repetitions})\n")
    print("| case | plain (baseline) | fast | split | auto |")
    print("|---|---|---|---|---|")
    for name in a.cases.split(","):
        q, k, v, pos, seq, tables, rp = make_case(*CASES[name], rng)
        runs = {
            "plain": lambda out: paged_attention(q, k, v, e32, e32, False, pos, seq, tables, BLOCK, rp, scale, lut,
                                                 out),
            "fast": lambda out: paged_attention_fast(q, k, v, e32, e32, False, pos, seq, tables, BLOCK, rp, scale,
                                                     lut, out),
            "split": lambda out: paged_attention_split_g4(q, k, v, e32, e32, False, pos, seq, tables, BLOCK, rp,
                                                          scale, lut, out),
            "auto": lambda out: paged_attention_auto(q, k, v, e32, e32, False, pos, seq, tables, BLOCK, rp, scale,
                                                     lut, out),
        }
        outs = {}
        for kname, fn in runs.items():
            outs[kname] = np.empty_like(q)
            fn(outs[kname])  # compile + check
        if not np.array_equal(outs["fast"], outs["split"]):
            raise SystemExit(f"{name}: split differs from fast")
        np.testing.assert_allclose(outs["fast"], outs["plain"], rtol=1e-4, atol=2e-3)
        times = {kname: [] for kname in runs}
        for _ in range(a.repetitions):
            for kname, fn in runs.items():  # interleaved: host noise hits every kernel alike
                t0 = time.perf_counter()
                for _layer in range(30):
                    fn(outs[kname])
                times[kname].append(time.perf_counter() - t0)
        med = {kname: statistics.median(ts) * 1e3 for kname, ts in times.items()}
        cells = [f"{med['plain']:.1f}"] + [f"{med[kn]:.1f} ({med['plain'] / med[kn]:.1f}x)"
                                           for kn in ("fast", "split", "auto")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
