#!/usr/bin/env python
"""Ternary matmul kernels side by side on the same shapes: SIMD multiply-add, plain multiply-add, lookup table.

    python scripts/bench_kernels.py [--shapes 2560x2560,6912x2560,2560x6912] [--tokens 1,8,128] [-t 1] [-r 5]

Prints a markdown table of the median ms and GMAC/s per kernel, shape and token count (results are checked to
be identical first). kernels/select.py's `auto` choice is based on these numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    import numba

    from bitnet_py.gguf.ternary_pack import pack_i2s_codes
    from kernels.select import KERNELS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2560x2560,6912x2560,2560x6912", help="MxK list")
    p.add_argument("--tokens", default="1,8,128")
    p.add_argument("--kernels", default="simd,plain,lut")
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=2.0, help="skip repeats of a case slower than this")
    a = p.parse_args(argv)
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"threads {a.threads}, load avg {os.getloadavg()[0]:.1f}\n")
    print("| M x K | T | " + " | ".join(f"{k} ms (GMAC/s)" for k in a.kernels.split(",")) + " |")
    print("|---|---|" + "---|" * len(a.kernels.split(",")))
    for shape in a.shapes.split(","):
        M, K = (int(v) for v in shape.split("x"))
        packed = pack_i2s_codes(rng.integers(-1, 2, (M, K)).astype(np.int8))
        for T in (int(v) for v in a.tokens.split(",")):
            q = rng.integers(-128, 128, (T, K)).astype(np.int8)
            s = np.ones(T, np.float32)
            sums = q.astype(np.int32).sum(1).astype(np.int32)
            cells, first = [], None
            for name in a.kernels.split(","):
                out = np.empty((T, M), np.float32)
                fn = KERNELS[name].matmul
                t0 = time.perf_counter()
                fn(packed, q, s, sums, np.float32(1), out, numba.get_num_threads())  # compile + check
                if first is None:
                    first = out.copy()
                elif not np.array_equal(out, first):
                    raise SystemExit(f"{name} differs from {a.kernels.split(',')[0]} at {M}x{K} T={T}")
                times = []
                for _ in range(a.repetitions):
                    t0 = time.perf_counter()
                    fn(packed, q, s, sums, np.float32(1), out, numba.get_num_threads())
                    times.append(time.perf_counter() - t0)
                    if times[-1] > a.max_seconds:
                        break
                med = statistics.median(times)
                cells.append(f"{med * 1e3:.3f} ({T * M * K / med / 1e9:.1f})")
            print(f"| {M} x {K} | {T} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
