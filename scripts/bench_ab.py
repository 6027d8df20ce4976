#!/usr/bin/env python
"""This tree's engine against another git revision's, in one process, alternated round by round:

    python scripts/bench_ab.py -m out/2b4t-i2s.gguf --against REV [-t 2] [--rounds 8] [-n 16] [-p 128] [-d 0] [-b 1]

The host drifts 10-30 % from one quarter hour to the next, more than most kernel changes gain, so timing two
trees in separate processes minutes apart decides little. Here REV's `bitnet_py` and `kernels` are extracted
(`git archive`) into a temporary folder as the packages `bitnet_py_<rev>` and `kernels_<rev>` (their absolute
imports of each other rewritten), both engines load the same model file (one page cache), and each round runs
a -p token prefill and -n decode steps from depth -d with one engine, then with the other (the order flips
every round), each on its own KV cache. Prints tok/s medians per engine and the median of the per-round
ratios (this tree / REV), and whether the two engines' logits are identical. `-b B`: B sequences (each with the
same context) decode together, one token each per step, as a server's batched step; decode tok/s count all B
tokens. "identical" compares the prefill's logits and one decode step's. `--top-k K`: this tree's steps ask
only for the top K logits (the screened head, bitnet_py/screened_head.py; `--against HEAD` on a clean tree is the
A/B of the screened and the full head), and "identical" compares the logits it computed and the top K ids.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BLOCK = 16
PACKAGES = ("bitnet_py", "kernels")


def packages_at(rev: str, packages=PACKAGES) -> str:
    """Extract REV's `packages` (`git archive`) into a temporary folder as `<package>_<rev>`, rewrite their absolute
    imports of each other to those names, and put the folder on sys.path -> the suffix `_<rev>`."""
    suffix = "_" + re.sub(r"\W", "_", rev)
    data = subprocess.run(["git", "-C", REPO, "archive", rev, *packages], capture_output=True, check=True).stdout
    folder = tempfile.mkdtemp(prefix="bench-ab-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(folder, filter="data")
    pattern = re.compile(r"^(\s*)(from|import) (" + "|".join(packages) + r")\b", re.MULTILINE)
    for package in packages:
        root = os.path.join(folder, package)
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        source = f.read()
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(pattern.sub(lambda m: f"{m[1]}{m[2]} {m[3]}{suffix}", source))
        os.rename(root, root + suffix)
    sys.path.insert(0, folder)
    return suffix


def engine_at(rev: str):
    """REV's bitnet_py.model module, imported as bitnet_py_<rev>.model beside this tree's (with kernels_<rev>)."""
    return importlib.import_module(f"bitnet_py{packages_at(rev)}.model")


def _batch(model_module, tokens: np.ndarray, start: int, tables: np.ndarray, seq: int = 0):
    """Tokens of sequence `seq` from position `start`, the last one's logits."""
    T = len(tokens)
    return model_module.Batch(tokens.astype(np.int32), np.arange(start, start + T, dtype=np.int32),
                              np.full(T, seq, np.int32), tables, np.array([T - 1], np.int32))


def _step(model_module, token: int, position: int, tables: np.ndarray):
    """One decode step of every sequence of `tables` (the same token and position), every sequence's logits."""
    n_seq = tables.shape[0]
    return model_module.Batch(np.full(n_seq, token, np.int32), np.full(n_seq, position, np.int32),
                              np.arange(n_seq, dtype=np.int32), tables, np.arange(n_seq, dtype=np.int32))


def same_logits(ours: np.ndarray, theirs: np.ndarray, top_k: int) -> bool:
    """All logits equal; with top_k, those `ours` computed (finite) equal and the top k ids are the same."""
    if not top_k:
        return np.array_equal(ours, theirs)
    read = np.isfinite(ours)
    top = [np.argsort(-x, axis=1, kind="stable")[:, :top_k] for x in (ours, theirs)]
    return bool(np.array_equal(ours[read], theirs[read]) and np.array_equal(*top))


def run(model_path: str, rev: str, threads: int, rounds: int, n_decode: int, n_prefill: int, depth: int,
        no_mmap: bool = False, top_k: int = 0, keep_file_map: bool = False, same_top_k: bool = False,
        batch: int = 1) -> dict:
    import numba

    from bitnet_py import model as ours_module
    from bitnet_py.sampling import TopRequest
    theirs_module = engine_at(rev)
    numba.set_num_threads(threads)
    engines = {"this tree": (ours_module, ours_module.Model.load(model_path, no_mmap=no_mmap,
                                                                 promote=not keep_file_map)),
               rev: (theirs_module, theirs_module.Model.load(model_path))}
    for _, model in engines.values():  # timed only once the weights are where they stay (bitnet_py.promotion)
        promotion = getattr(model.gguf, "promotion", None)
        if promotion is not None:
            promotion.wait()
    n_ctx = depth + max(n_prefill, 1) + n_decode + 1
    blocks = (n_ctx + BLOCK - 1) // BLOCK
    tables = np.arange(batch * blocks, dtype=np.int32).reshape(batch, blocks)  # i32[batch, blocks]
    rng = np.random.default_rng(0)
    context = rng.integers(0, engines["this tree"][1].config.n_vocab, depth + max(n_prefill, 1) + n_decode + 1)
    caches, logits = {}, {}

    def heads(name, rows):  # forward's head requests, if any
        return ([TopRequest(top_k)] * rows,) if top_k and (name == "this tree" or same_top_k) else ()

    position = depth + max(n_prefill, 1)
    for name, (module, model) in engines.items():  # every sequence's context up to the depth, in chunks, and the
        kv = caches[name] = model.new_kv_cache(batch * blocks, BLOCK)  # prefill tokens; warm-up; logits
        for seq in range(batch):
            for start in range(0, depth, 512):
                model.forward(_batch(module, context[start:min(depth, start + 512)], start, tables, seq), kv)
            out = model.forward(_batch(module, context[depth:position], depth, tables, seq), kv, *heads(name, 1))
            logits.setdefault(name, []).append(out)
        # one decode step too: steps of few tokens take other code (kernels.layer_steps) than the prefill
        logits[name].append(model.forward(_step(module, context[position], position, tables), kv,
                                          *heads(name, batch)))
    identical = all(same_logits(a, b, top_k) for a, b in zip(*logits.values()))
    times = {name: {"prefill": [], "decode": []} for name in engines}
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            module, model = engines[name]
            kv = caches[name]
            if n_prefill:
                t0 = time.perf_counter()
                model.forward(_batch(module, context[depth:depth + n_prefill], depth, tables), kv, *heads(name, 1))
                times[name]["prefill"].append(n_prefill / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i in range(n_decode):
                model.forward(_step(module, context[position + i], position + i, tables), kv, *heads(name, batch))
            if n_decode:
                times[name]["decode"].append(batch * n_decode / (time.perf_counter() - t0))
    promotion = engines["this tree"][1].gguf.promotion
    result = {"identical_logits": bool(identical), "tests": [], "batch": batch,
              "promoted_bytes": 0 if promotion is None else promotion.promoted_bytes}
    ours, theirs = list(engines)
    for test, n in (("prefill", n_prefill), ("decode", n_decode)):
        if not n:
            continue
        a, b = times[ours][test], times[theirs][test]
        name = f"pp{n}" if test == "prefill" else f"tg{n}" + (f" x {batch} sequences" if batch > 1 else "")
        result["tests"].append(dict(test=name, ours=statistics.median(a),
                                    theirs=statistics.median(b),
                                    ratio=statistics.median(x / y for x, y in zip(a, b)),
                                    ahead=sum(x > y for x, y in zip(a, b)), rounds=len(a)))
    return result


def main(argv=None) -> int:
    import numba
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--against", required=True, metavar="REV", help="git revision to compare with (e.g. HEAD~1)")
    p.add_argument("-t", "--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("-n", "--n-decode", type=int, default=16, help="decode steps per round (0: none)")
    p.add_argument("-p", "--n-prefill", type=int, default=128, help="prefill tokens per round (0: none)")
    p.add_argument("-d", "--depth", type=int, default=0, help="tokens already in the KV cache")
    p.add_argument("-b", "--batch", type=int, default=1,
                   help="sequences decoded together, one token each per step (a server's batched step)")
    p.add_argument("--no-mmap", action="store_true",
                   help="load this tree's model with --no-mmap (REV's maps the file): with --against HEAD and a "
                        "clean tree, the A/B of the two ways to hold the weights")
    p.add_argument("--keep-file-map", action="store_true",
                   help="this tree reads the weights from the file map, as REV did before bitnet_py.promotion (with "
                        "--against HEAD: the A/B of the promotion into huge pages; both: the A/A noise floor)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="this tree's steps ask only for the top K logits (screened head); 0 = all (default)")
    p.add_argument("--same-top-k", action="store_true",
                   help="REV's steps ask for the top K too (a REV with the screened head: 1527f15 or later)")
    a = p.parse_args(argv)
    if (a.rounds < 1 or a.n_decode < 0 or a.n_prefill < 0 or a.depth < 0 or a.n_decode + a.n_prefill == 0
            or a.top_k < 0 or a.batch < 1):
        raise SystemExit("error: need --rounds >= 1, -b >= 1, -n/-p/-d/--top-k >= 0 and something to time (-n or -p)")
    res = run(a.model, a.against, a.threads, a.rounds, a.n_decode, a.n_prefill, a.depth, a.no_mmap, a.top_k,
              a.keep_file_map, a.same_top_k, a.batch)
    print(f"{os.path.basename(a.model)}, {a.threads} threads, depth {a.depth}, {a.rounds} rounds, load avg "
          f"{os.getloadavg()[0]:.1f}{'; this tree --no-mmap' if a.no_mmap else ''}; this tree's weights promoted "
          f"to huge pages: {res['promoted_bytes'] / 1e9:.2f} GB"
          f"{f'; this tree reads the top {a.top_k} logits' if a.top_k else ''}"
          f"{f', {a.against} too' if a.top_k and a.same_top_k else ''}; logits identical to "
          f"{a.against}: {res['identical_logits']}\n")
    print(f"| test | this tree tok/s | {a.against} tok/s | ratio (median per round) | rounds ahead |")
    print("|---|---|---|---|---|")
    for t in res["tests"]:
        print(f"| {t['test']} | {t['ours']:.2f} | {t['theirs']:.2f} | {t['ratio']:.3f} | {t['ahead']}/{t['rounds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
