#!/usr/bin/env python
"""Same-machine speed against upstream llama.cpp, the two engines alternated in one run:

    python scripts/bench_vs_llama_cpp.py --ours out/f1b-i2s.gguf --peer out/f1b-tq2.gguf \
        -p 128 -n 64 -t 2 -r 5 --rounds 3 [--json]

`--ours` runs in bitnet-py (any file it loads, e.g. I2_S), `--peer` in upstream llama.cpp through llama-cpp-python
(scripts/install_llama_cpp_python.sh; built for AVX2/FMA/F16C). Upstream reads neither I2_S nor bitnet.cpp's TL2,
so the peer file is a twin at the same layout in a type upstream has, e.g. TQ2_0 from the dummy generator:
`python -m bitnet_py.dummy --layout falcon3-1b --type tq2_0` (its `llama` arch is one upstream runs; it has no
`bitnet-b1.58` arch, so 2B-4T itself cannot be compared this way). The layouts must match.

Tests as in `python -m bitnet_py.bench`: ppN = one forward of N random tokens from an empty cache (logits of the
last only), tgN = N one-token forwards from an empty cache. Each round measures one engine then the other (the
order flips every round, so a drifting host hurts both alike): one warm-up, then -r runs of each test. Printed:
median tok/s of each engine over all runs, their ratio, and the ratio of every round's medians.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYOUT_FIELDS = ("arch", "n_layer", "n_embd", "n_ff", "n_head", "n_kv_head", "head_dim", "n_vocab")


def build_parser() -> argparse.ArgumentParser:
    from bitnet_py.bench import parse_ints
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ours", required=True, help="GGUF for bitnet-py (e.g. I2_S)")
    p.add_argument("--peer", required=True, help="GGUF for upstream llama.cpp at the same layout (e.g. TQ2_0)")
    p.add_argument("-p", "--n-prompt", type=parse_ints, default=[128])
    p.add_argument("-n", "--n-gen", type=parse_ints, default=[64])
    p.add_argument("-t", "--threads", type=parse_ints, default=[os.cpu_count() or 1])
    p.add_argument("-r", "--repetitions", type=int, default=5, help="runs per test and round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two engines (default 3)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def layout(path: str) -> dict:
    from bitnet_py.config import ModelConfig
    from bitnet_py.gguf.reader import GGUFFile
    with GGUFFile(path) as f:
        cfg = ModelConfig.from_gguf(f)
        types = sorted({t.type_name for t in f.tensors.values() if len(t.np_shape) == 2})
    return {**{k: getattr(cfg, k) for k in LAYOUT_FIELDS}, "matrix_types": types}


class Ours:
    name = "bitnet-py"

    def __init__(self, path: str, n_ctx: int):
        from bitnet_py.bench import _tables
        from bitnet_py.model import Model
        self.model = Model.load(path)
        self.model.gguf.wait_promoted()  # timed once the weights are in huge pages (bitnet_py.promotion)
        self.kv = self.model.new_kv_cache((n_ctx + 15) // 16, 16)
        self.tables = _tables(n_ctx, 16)

    def prefill(self, tokens: np.ndarray, nt: int) -> float:
        import numba

        from bitnet_py.bench import run_prefill
        numba.set_num_threads(nt)
        return run_prefill(self.model, self.kv, self.tables, tokens)

    def decode(self, tokens: np.ndarray, nt: int) -> float:
        import numba

        from bitnet_py.bench import run_decode
        numba.set_num_threads(nt)
        return run_decode(self.model, self.kv, self.tables, tokens)


class Peer:
    """Upstream llama.cpp; one context per thread count (llama.cpp fixes threads per context)."""
    name = "llama.cpp"

    def __init__(self, path: str, n_ctx: int):
        import llama_cpp
        self.llama_cpp, self.path, self.n_ctx, self.contexts = llama_cpp, path, n_ctx, {}

    def _llm(self, nt: int):
        if nt not in self.contexts:
            self.contexts[nt] = self.llama_cpp.Llama(
                model_path=self.path, n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx, n_threads=nt,
                n_threads_batch=nt, verbose=False)
        return self.contexts[nt]

    def prefill(self, tokens: np.ndarray, nt: int) -> float:
        llm = self._llm(nt)
        llm.reset()  # empty cache: eval() drops the cached positions from n_tokens on
        t0 = time.perf_counter()
        llm.eval([int(t) for t in tokens])
        return time.perf_counter() - t0

    def decode(self, tokens: np.ndarray, nt: int) -> float:
        llm = self._llm(nt)
        llm.reset()
        t0 = time.perf_counter()
        for t in tokens:
            llm.eval([int(t)])
        return time.perf_counter() - t0


def measure(engine, tests: list[tuple[str, int]], nt: int, reps: int, tokens: np.ndarray) -> dict:
    """-> {test: [tok/s per run]} after one warm-up of each test."""
    out = {}
    for kind, n in tests:
        run = engine.prefill if kind == "pp" else engine.decode
        run(tokens[:n] if kind == "pp" else tokens[:min(n, 4)], nt)  # warm-up
        out[f"{kind}{n}"] = [n / run(tokens[:n], nt) for _ in range(reps)]
    return out


def run(args) -> dict:
    import llama_cpp
    import numba
    if args.repetitions < 1 or args.rounds < 1 or not args.threads or 0 in args.threads:
        raise ValueError("-r, --rounds and -t must be >= 1")
    if max(args.threads) > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"-t {max(args.threads)} exceeds NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    ours_layout, peer_layout = layout(args.ours), layout(args.peer)
    differ = [k for k in LAYOUT_FIELDS if ours_layout[k] != peer_layout[k]]
    if differ:
        raise ValueError("the two files have different layouts: " + ", ".join(
            f"{k} {ours_layout[k]} vs {peer_layout[k]}" for k in differ))
    tests = [("pp", p) for p in args.n_prompt if p] + [("tg", n) for n in args.n_gen if n]
    if not tests:
        raise ValueError("nothing to measure: every -p and -n is 0")
    n_ctx = max(n for _, n in tests)
    tokens = np.random.default_rng(args.seed).integers(0, ours_layout["n_vocab"], n_ctx)
    engines = [Ours(args.ours, n_ctx), Peer(args.peer, n_ctx)]
    runs = {}  # (engine, test, threads) -> [[tok/s per run] per round]
    for rnd in range(args.rounds):
        for engine in (engines if rnd % 2 == 0 else engines[::-1]):
            for nt in args.threads:
                for test, values in measure(engine, tests, nt, args.repetitions, tokens).items():
                    runs.setdefault((engine.name, test, nt), []).append(values)
                    print(f"  round {rnd + 1} {engine.name} {test} t={nt}: {statistics.median(values):.2f} tok/s",
                          file=sys.stderr, flush=True)
    results = []
    for nt in args.threads:
        for kind, n in tests:
            test = f"{kind}{n}"
            ours, peer = runs[("bitnet-py", test, nt)], runs[("llama.cpp", test, nt)]
            med_ours = statistics.median(v for r in ours for v in r)
            med_peer = statistics.median(v for r in peer for v in r)
            results.append(dict(test=test, threads=nt, ours_tok_s=med_ours, peer_tok_s=med_peer,
                                ratio=med_ours / med_peer,
                                round_ratios=[statistics.median(a) / statistics.median(b) for a, b in zip(ours, peer)],
                                ours_runs=ours, peer_runs=peer))
    from bitnet_py.bench_report import cpu_name
    return dict(ours=args.ours, peer=args.peer, layout=ours_layout, peer_types=peer_layout["matrix_types"],
                llama_cpp_python=llama_cpp.__version__, cpu=cpu_name(), n_cpu=os.cpu_count(),
                repetitions=args.repetitions, rounds=args.rounds, results=results)


def markdown(res: dict) -> str:
    lay = res["layout"]
    lines = [f"bitnet-py `{res['ours']}` ({', '.join(lay['matrix_types'])}) vs upstream llama.cpp "
             f"(llama-cpp-python {res['llama_cpp_python']}) `{res['peer']}` ({', '.join(res['peer_types'])}); "
             f"layout {lay['arch']} {lay['n_layer']} x {lay['n_embd']}, ff {lay['n_ff']}, vocab {lay['n_vocab']}; "
             f"cpu: {res['cpu']} x{res['n_cpu']}; {res['rounds']} rounds x {res['repetitions']} runs", "",
             "| test | threads | bitnet-py tok/s | llama.cpp tok/s | ratio | ratio per round |", "|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['test']} | {r['threads']} | {r['ours_tok_s']:.2f} | {r['peer_tok_s']:.2f} | "
                     f"{r['ratio']:.2f}x | {', '.join(f'{v:.2f}' for v in r['round_ratios'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bitnet_py.bench_report import print_result
    args = build_parser().parse_args(argv)
    for path in (args.ours, args.peer):
        if not os.path.isfile(path):
            print(f"error: no such model file: {path}", file=sys.stderr)
            return 1
    if importlib.util.find_spec("llama_cpp") is None:
        print("error: llama-cpp-python is not installed (scripts/install_llama_cpp_python.sh)", file=sys.stderr)
        return 1
    return print_result(run, args, markdown)


if __name__ == "__main__":
    sys.exit(main())
