"""`python -m bitnet_py.bench -m MODEL -p 128,512 -n 64,128 -t 1,2 -r 5 [--json]`: speed like llama-bench.

For every thread count: prefill `ppN` (one forward of N tokens, logits for the last) and decode `tgN` (N
one-token forwards from an empty cache), each repeated `-r` times after one warm-up, reported as mean ± sd
tok/s (and the median). `-d D` (like llama-bench's) runs the tests after D tokens already sit in the KV cache
(`ppN @ dD`, `tgN @ dD`; one untimed prefill of D random tokens per depth): speed at long contexts, where
attention reads the whole cache every token. Also: model load ms, JIT warm-up (cold = empty kernel cache, cached = second start;
measured in child processes, skip with --no-jit), peak RSS against model file + KV cache, memory bandwidth
measured in the same run (all threads reading the model's memory map), bytes read per decoded token, the
decode roofline (bandwidth / bytes per token) and the share of it reached, and the ratio to bitnet.cpp's
recorded llama-bench numbers for the BitNet-b1.58-2B-4T layout (issue 3, 2 vCPU AMD EPYC Genoa).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from .bench_report import cpu_name, cpu_times, markdown, print_result, progress, steal_pct
from .huge_pages import KEEP_FILE_MAP_HELP, NO_MMAP_HELP, huge_page_bytes, huge_page_bytes_in, huge_pages_mode

log = logging.getLogger(__name__)

# bitnet.cpp llama-bench on 2 vCPU AMD EPYC Genoa (AVX-512 VNNI), 2B-4T layout: (type, threads) -> (pp128, tg64)
BITNET_CPP = {("I2_S", 1): (34.6, 14.2), ("I2_S", 2): (64.5, 22.2), ("TL2", 2): (45.8, 22.3)}
LAYOUT_2B_4T = dict(n_layer=30, n_embd=2560, n_ff=6912, n_vocab=128256)


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bitnet_py.bench", description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", required=True, help="GGUF model file")
    p.add_argument("-p", "--n-prompt", type=parse_ints, default=[128], help="prefill lengths (default 128)")
    p.add_argument("-n", "--n-gen", type=parse_ints, default=[64], help="decode lengths (default 64)")
    p.add_argument("-t", "--threads", type=parse_ints, default=[os.cpu_count() or 1], help="thread counts")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="runs per test (default 5)")
    p.add_argument("-d", "--depth", type=parse_ints, default=[0],
                   help="context depths: each test runs after this many tokens are already in the KV cache "
                        "(filled by one untimed prefill; default 0), like llama-bench's -d")
    p.add_argument("--kernel", default=None, help="ternary kernel: auto, mad, plain, lut (default: auto)")
    p.add_argument("--head-type", default="f16", choices=("f16", "int8"),
                   help="output head: f16 (exact, default) or int8 (per-row scales, approximate)")
    p.add_argument("--logits", default="all", choices=("all", "greedy"),
                   help="all (default): every step computes all n_vocab logits, as llama-bench; greedy: only what "
                        "a greedy sampler reads, the exact top logit from the screened head (bitnet_py.screened_head)")
    p.add_argument("--tl2-config", default=None, help="TL2 kernel_config.ini (TL2 files)")
    p.add_argument("--no-mmap", action="store_true",
                   help=NO_MMAP_HELP)
    p.add_argument("--keep-file-map", action="store_true", help=KEEP_FILE_MAP_HELP)
    p.add_argument("--no-jit", action="store_true", help="skip the cold/cached JIT start-up probes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of markdown")
    p.add_argument("--seed", type=int, default=0)
    return p


DEPTH_FILL_CHUNK = 512  # tokens per forward when -d fills the context (bounds the activation memory)


def _tables(n_tokens: int, block_size: int) -> np.ndarray:
    return np.arange((n_tokens + block_size - 1) // block_size, dtype=np.int32)[None, :]


def _batch(tokens: np.ndarray, start: int, tables: np.ndarray):
    from .model import Batch
    T = len(tokens)
    return Batch(tokens=tokens.astype(np.int32), positions=np.arange(start, start + T, dtype=np.int32),
                 seq_index=np.zeros(T, np.int32), block_tables=tables, logit_rows=np.array([T - 1], np.int32))


def run_prefill(model, kv, tables, tokens, start: int = 0, heads=None) -> float:
    t0 = time.perf_counter()
    model.forward(_batch(tokens, start, tables), kv, heads)
    return time.perf_counter() - t0


def run_decode(model, kv, tables, tokens, start: int = 0, heads=None) -> float:
    t0 = time.perf_counter()
    for i, tok in enumerate(tokens):
        model.forward(_batch(tokens[i:i + 1], start + i, tables), kv, heads)
    return time.perf_counter() - t0


def test_name(kind: str, n: int, depth: int) -> str:
    return f"{kind}{n}" + (f" @ d{depth}" if depth else "")


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "runs": values}


def decode_bytes(model, n_ctx: int, screened: bool = False) -> dict:
    """Bytes one decode step reads: weights of every matmul + KV cache at n_ctx (+ norms, negligible); `screened`
    (--logits greedy): the head's int8 copy and row terms (plus the exact rows recomputed, ~0.01-1 % of the f16
    head) instead of the head."""
    from .weights import DenseWeight, TernaryWeight
    W, c = model.weights, model.config

    def nbytes(w) -> int:
        if isinstance(w, TernaryWeight):
            return w.packed.nbytes + (w.block_scales.nbytes if w.block_scales is not None else 0)
        if w.i8 is not None:
            return w.i8.nbytes + w.i8_scales.nbytes
        return w.f16_bits.nbytes if w.f16_bits is not None else w.f32.nbytes

    ternary = sum(nbytes(w) for L in W.layers for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down))
    screen = W.screen if screened else None
    head = nbytes(W.output) if screen is None else screen.q.nbytes + screen.rows.nbytes
    head_type = W.output.source_type if isinstance(W.output, DenseWeight) else "?"
    kv = 2 * c.n_layer * c.n_kv_head * c.head_dim * n_ctx * (2 if model.cache_type == "f16" else 4)
    return {"layers": ternary, "head": head, "kv": kv, "total": ternary + head + kv,
            "head_type": head_type if screen is None else f"I8 screen of {head_type}"}


def _decode_arrays(model, screened: bool = False) -> list[np.ndarray]:
    """The weight arrays a decode step streams (ternary layers and the output head, as the model holds them:
    mapped file pages, or the repacked / int8 copies) as u64 words."""
    from .weights import TernaryWeight
    W = model.weights
    arrays = [w.packed for L in W.layers for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)
              if isinstance(w, TernaryWeight)]
    head = W.output
    arrays.append(W.screen.q if screened else
                  next(a for a in (head.i8, head.f16_bits, head.f32) if a is not None))
    words = []
    for a in arrays:
        b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        if b.size >= 8:
            words.append(b[:b.size // 8 * 8].view(np.uint64))
    return words


def measure_bandwidth(model, screened: bool = False, repeats: int = 3) -> float:
    """GB/s reading the weights a decode step reads (one parallel read per matrix, as the decode step), with the
    current thread count; best of `repeats`. Only memory the model already uses is read, so the probe does not
    add to the peak RSS."""
    import numba

    from kernels.membw import chunk_words, read_sum
    words = _decode_arrays(model, screened)
    chunks = [chunk_words(w.size, numba.get_num_threads()) for w in words]
    partials = [np.zeros((w.size + c - 1) // c, np.uint64) for w, c in zip(words, chunks)]
    for w, c, part in zip(words, chunks, partials):
        read_sum(w, c, part)  # first touch + compile
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(read_sum(w, c, part) for w, c, part in zip(words, chunks, partials))
        best = max(best, n / (time.perf_counter() - t0) / 1e9)
    return best


def weight_type(model) -> str:
    from .weights import TernaryWeight
    w = model.weights.layers[0].wq
    return w.source_type if isinstance(w, TernaryWeight) else w.source_type


def _on_amx_kernel(w) -> bool:
    """Whether weight w's matmuls take a kernel with the AMX path (per-tensor-scaled ternary: the SIMD kernel on
    I2_S bytes, or the base-3 one)."""
    from kernels.select import weight_kernels
    from .weights import TernaryWeight
    return (isinstance(w, TernaryWeight) and w.block_scales is None
            and weight_kernels(w.layout, w.m, w.k).name in ("simd", "b3"))


def is_2b4t(model) -> bool:
    c = model.config
    return all(getattr(c, k) == v for k, v in LAYOUT_2B_4T.items())


_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from bitnet_py.model import Model
from bitnet_py.bench import _batch, _tables
from bitnet_py.sampling import TopRequest
t1 = time.perf_counter()
m = Model.load(sys.argv[1], tl2_config=sys.argv[2] or None)
t2 = time.perf_counter()
kv = m.new_kv_cache(1, 16)
tables = _tables(16, 16)
def steps():
    for n in (1, 2, 3, 5):  # every kernel specialization a server meets (1..4-token tiles), both head paths
        m.forward(_batch(np.arange(n) + 5, 0, tables), kv, [TopRequest(1)] if n % 2 else None)
steps()
t3 = time.perf_counter()
steps()  # same work again, compiled: the difference is compilation / cache loading
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "warmup_s": t3 - t2, "ready_s": t3 - t0,
                  "compute_s": t4 - t3, "jit_s": max(0.0, (t3 - t2) - (t4 - t3))}))
"""


def jit_probe(model_path: str, tl2_config: str | None) -> dict:
    """Start-up in child processes: cold (empty kernel cache) then cached (same cache dir)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="bitnet-py-jit-") as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, BITNET_PY_NO_CACHE="0")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        for phase in ("cold", "cached"):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _PROBE, model_path, tl2_config or ""], env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"JIT probe failed: {r.stderr.strip()[-2000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["process_s"] = time.perf_counter() - t0
            out[phase] = res
    return out


def run(args) -> dict:
    import numba

    from kernels import config as kernel_config
    from kernels.amx import HAVE_AMX
    from .model import Model
    from .sampling import TopRequest
    if args.kernel:
        kernel_config.TERNARY_KERNEL = args.kernel
    if max(args.threads, default=1) > numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"error: -t {max(args.threads)} exceeds NUMBA_NUM_THREADS="
                         f"{numba.config.NUMBA_NUM_THREADS} (set it before starting)")
    if args.repetitions < 1 or 0 in args.threads:
        raise SystemExit("error: -r and -t must be >= 1")
    if min(args.depth) < 0:
        raise SystemExit("error: -d must be >= 0")
    jit = None if args.no_jit else jit_probe(args.model, args.tl2_config)
    t0 = time.perf_counter()
    greedy = args.logits == "greedy"
    model = Model.load(args.model, tl2_config=args.tl2_config, head_type=args.head_type, no_mmap=args.no_mmap,
                       screen_head=greedy, promote=not args.keep_file_map)
    if greedy and model.weights.screen is None:
        raise SystemExit("error: --logits greedy needs an F16 output head, --head-type f16 and a host with F16C")
    heads = [TopRequest(1)] if greedy else None
    load_ms = (time.perf_counter() - t0) * 1000
    model.gguf.wait_promoted()  # timed once the weights are where they stay
    rng = np.random.default_rng(args.seed)
    n_ctx = max(args.depth) + max(args.n_prompt + args.n_gen + [1])
    if n_ctx > model.max_positions:
        raise SystemExit(f"error: depth + test length {n_ctx} exceeds the model's context ({model.max_positions})")
    kv = model.new_kv_cache((n_ctx + 15) // 16, 16)
    tables = _tables(n_ctx, 16)
    vocab = model.config.n_vocab
    wtype = weight_type(model)
    db = decode_bytes(model, max(args.n_gen + [1]) // 2, greedy)
    results = []
    bandwidth = {}
    for depth in sorted(set(args.depth)):
        fill = rng.integers(0, vocab, depth)  # the context every test of this depth starts from (positions >=
        for start in range(0, depth, DEPTH_FILL_CHUNK):  # depth are rewritten), in chunks as the server does, with
            run_prefill(model, kv, tables, fill[start:start + DEPTH_FILL_CHUNK], start, heads)  # the tests' head
        for nt in args.threads:
            numba.set_num_threads(nt)
            if nt not in bandwidth:
                bandwidth[nt] = measure_bandwidth(model, greedy)
            for p in args.n_prompt:
                if p == 0:
                    continue
                toks = rng.integers(0, vocab, p)
                run_prefill(model, kv, tables, toks, depth, heads)  # warm-up (compiles this shape's kernels)
                c0 = cpu_times()
                times = [run_prefill(model, kv, tables, toks, depth, heads) for _ in range(args.repetitions)]
                results.append(dict(test=test_name("pp", p, depth), threads=nt, n=p, depth=depth,
                                    load=os.getloadavg()[0], steal_pct=steal_pct(c0, cpu_times()),
                                    tok_s=stats([p / t for t in times])))
                progress(results[-1])
            for n in args.n_gen:
                if n == 0:
                    continue
                toks = rng.integers(0, vocab, n)
                run_decode(model, kv, tables, toks[:min(n, 4)], depth, heads)  # warm-up
                c0 = cpu_times()
                times = [run_decode(model, kv, tables, toks, depth, heads) for _ in range(args.repetitions)]
                r = dict(test=test_name("tg", n, depth), threads=nt, n=n, depth=depth, load=os.getloadavg()[0],
                         steal_pct=steal_pct(c0, cpu_times()), tok_s=stats([n / t for t in times]))
                roof = bandwidth[nt] * 1e9 / decode_bytes(model, depth + n // 2, greedy)["total"]  # KV grows with depth
                r["roofline_tok_s"] = roof
                r["roofline_pct"] = 100 * r["tok_s"]["median"] / roof
                results.append(r)
                progress(r)
    for r in results:
        comparable = is_2b4t(model) and args.head_type == "f16" and (wtype, r["threads"]) in BITNET_CPP
        if comparable and r["test"] in ("pp128", "tg64"):
            ref = BITNET_CPP[(wtype, r["threads"])][0 if r["test"] == "pp128" else 1]
            r["bitnet_cpp_tok_s"] = ref
            r["vs_bitnet_cpp"] = r["tok_s"]["median"] / ref
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    file_bytes = os.path.getsize(args.model)
    return dict(model=args.model, arch=model.config.arch, type=wtype, head_type=args.head_type, logits=args.logits,
                file_bytes=file_bytes,
                kernel=kernel_config.TERNARY_KERNEL, threading_layer=numba.threading_layer(),
                openmp_wait=kernel_config.openmp_wait(),
                amx=HAVE_AMX and _on_amx_kernel(model.weights.layers[0].wq),
                layout=getattr(model.weights.layers[0].wq, "layout", ""),
                load_ms=load_ms, tl2_source=model.weights.tl2_source, jit=jit, peak_rss_bytes=peak_rss,
                weights_memory=weights_memory(model), huge_pages_mode=huge_pages_mode(),
                kv_bytes=kv.nbytes,
                rss_ratio=peak_rss / (file_bytes + kv.nbytes), bandwidth_gb_s=bandwidth,
                decode_bytes=db, results=results, cpu=cpu_name(), n_cpu=os.cpu_count())


def weights_memory(model) -> dict:
    """How the model's bytes are held: the file mapped (4 KiB page-cache pages; after a promotion, with its
    bytes promoted and how long that took in the background, bitnet_py.promotion), or an anonymous copy
    (`--no-mmap`); with the bytes of the model's map backed by huge pages now (None where /proc does not say)."""
    if not model.gguf.mapped:
        return dict(kind="anonymous", huge_page_bytes=huge_page_bytes(model.gguf._data))
    promotion = model.gguf.promotion
    if promotion is None:
        return dict(kind="mmap", huge_page_bytes=0)
    backed = [huge_page_bytes_in(address, size) for address, size in promotion.ranges]  # the file's, a cache's
    return dict(kind="promoted", huge_page_bytes=None if None in backed else sum(backed),
                promoted_bytes=promotion.promoted_bytes, promote_s=promotion.seconds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not os.path.isfile(args.model):
        print(f"error: no such model file: {args.model}", file=sys.stderr)
        return 1
    return print_result(run, args, markdown)


if __name__ == "__main__":
    sys.exit(main())
