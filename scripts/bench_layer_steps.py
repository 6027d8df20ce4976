#!/usr/bin/env python
"""The model's two per-layer paths side by side, in one process, alternated round by round:

    python scripts/bench_layer_steps.py -m out/2b4t-i2s.gguf [-t 2] [--rounds 10] [-n 16] [--tokens 1,8]

`steps`: each layer as kernels/layer_steps.py's two compiled calls around attention (what the model runs for
steps of up to LAYER_STEPS_MAX_TOKENS tokens); `general`: the per-kernel Python path. Each round decodes -n
steps of every batch size in --tokens (sequences decoded together, one token each) with one path, then with
the other (the order flips every round), on the same KV cache. Prints tok/s medians and the median of the
per-round ratios (steps / general); logits are checked bit-identical first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCK = 16


def _decode_batch(n_seq: int, position: int, blocks: int):
    from bitnet_py.model import Batch
    tables = np.arange(n_seq * blocks, dtype=np.int32).reshape(n_seq, blocks)
    return Batch(np.full(n_seq, 5 + position % 97, np.int32), np.full(n_seq, position, np.int32),
                 np.arange(n_seq, dtype=np.int32), tables, np.arange(n_seq, dtype=np.int32))


def run(model_path: str, threads: int, rounds: int, n_steps: int, batch_sizes: list[int]) -> list[dict]:
    import numba

    from bitnet_py.model import Model
    numba.set_num_threads(threads)
    model = Model.load(model_path)
    model.gguf.wait_promoted()  # both paths timed from where the weights stay (bitnet_py.promotion)
    if model._steps is None:
        raise SystemExit("error: this model runs the general path only (layer steps need all-I2_S/TL2 ternary "
                         "layers, the default kernels and BITNET_PY_LAYER_STEPS on)")
    steps = model._steps
    blocks = (4 + rounds * 2 * n_steps + BLOCK) // BLOCK + 1
    results = []
    for n_seq in batch_sizes:
        kv = model.new_kv_cache(n_seq * blocks, BLOCK)
        outs = []
        for path in (steps, None):  # warm-up (compiles), and the bit-identity check on the same positions
            model._steps = path
            outs.append([model.forward(_decode_batch(n_seq, p, blocks), kv) for p in range(2)])
        if not all(np.array_equal(a, b) for a, b in zip(*outs)):
            raise SystemExit("error: layer steps and the general path gave different logits")
        times = {"steps": [], "general": []}
        position = 2
        for r in range(rounds):
            for name in (("steps", "general") if r % 2 == 0 else ("general", "steps")):
                model._steps = steps if name == "steps" else None
                t0 = time.perf_counter()
                for _ in range(n_steps):
                    model.forward(_decode_batch(n_seq, position, blocks), kv)
                    position += 1
                times[name].append((time.perf_counter() - t0) / (n_steps * n_seq))
        model._steps = steps
        results.append(dict(tokens=n_seq, threads=threads,
                            steps_tok_s=1 / statistics.median(times["steps"]),
                            general_tok_s=1 / statistics.median(times["general"]),
                            ratio=statistics.median(g / s for s, g in zip(times["steps"], times["general"]))))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-t", "--threads", default="2", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("-n", "--steps", type=int, default=16, help="decode steps per path per round")
    p.add_argument("--tokens", default="1,8", help="comma-separated batch sizes (sequences per decode step)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("error: --rounds and -n must be >= 1")
    print("| tokens per step | threads | steps tok/s | general tok/s | steps / general (median of rounds) |")
    print("|---|---|---|---|---|")
    for t in (int(x) for x in args.threads.split(",")):
        for r in run(args.model, t, args.rounds, args.steps, [int(x) for x in args.tokens.split(",")]):
            print(f"| {r['tokens']} | {r['threads']} | {r['steps_tok_s']:.2f} | {r['general_tok_s']:.2f} | "
                  f"{r['ratio']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
