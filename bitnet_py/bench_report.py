"""Host readings and output of the benchmarks (`bitnet_py.bench`, scripts/bench_vs_llama_cpp.py): CPU name and
steal share, progress lines, the markdown table of `python -m bitnet_py.bench`, and the shared CLI ending (errors
as one line and exit status 1, else JSON or markdown)."""
from __future__ import annotations

import json
import sys


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_pct(before, after) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two cpu_times() readings: on shared
    cloud hosts this explains runs that are slower for no reason in this process."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def fmt_steal(r: dict) -> str:
    return "-" if r.get("steal_pct") is None else f"{r['steal_pct']:.0f} %"


def progress(r: dict) -> None:
    print(f"  {r['test']} t={r['threads']}: {r['tok_s']['median']:.2f} tok/s (load avg {r['load']:.1f}, "
          f"steal {fmt_steal(r)})", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def memory_note(memory: dict | None, file_bytes: int) -> str:
    """', file mapped', ', file mapped, then N GB promoted ...' or ', --no-mmap: anonymous copy, N GiB of it in huge
    pages' for the model-load line."""
    if not memory:
        return ""
    if memory["kind"] == "mmap":
        return ", file mapped"
    huge = memory.get("huge_page_bytes")
    if memory["kind"] == "promoted":
        backed = "" if huge is None else f" ({huge / 1e9:.2f} GB of it backed by huge pages)"
        return (f", file mapped, then {memory['promoted_bytes'] / 1e9:.2f} GB of it (and of a repack cache) promoted "
                f"to huge pages in {memory['promote_s']:.1f} s in the background{backed}")
    share = "" if huge is None else f", {huge / 2**30:.2f} of {file_bytes / 2**30:.2f} GiB in huge pages"
    return f", --no-mmap: anonymous copy{share}"


LOGITS_NOTE = {"all": "all n_vocab per step (as llama-bench)",
               "greedy": "the exact top-1 per step (screened head; greedy tokens identical to all)"}


AMX_NOTE = " (AMX tiles for steps of 16+ tokens)"
LAYOUT_NOTE = {"b3": " on base-3 weights (1.6 bits per weight)"}


def openmp_note(res: dict) -> str:
    """How idle OpenMP threads waited (kernels.config.openmp_wait); only the omp layer reads it."""
    wait = res.get("openmp_wait")
    return f" ({wait})" if wait and res.get("threading_layer") == "omp" else ""


def markdown(res: dict) -> str:
    gb = 1e9
    lines = [f"model: `{res['model']}` ({res['arch']}, {res['type']}, {res['file_bytes'] / 2**30:.2f} GiB), "
             f"cpu: {res['cpu']} x{res['n_cpu']}, numba threading layer: {res['threading_layer']}"
             f"{openmp_note(res)}, "
             f"ternary kernel: {res['kernel']}{LAYOUT_NOTE.get(res.get('layout'), '')}"
             f"{AMX_NOTE if res.get('amx') else ''}, head: {res['head_type']}, "
             f"logits: {LOGITS_NOTE[res.get('logits', 'all')]}, "
             f"transparent huge pages: {res.get('huge_pages_mode') or 'unknown'}", "",
             "| test | threads | tok/s (mean ± sd) | median | load avg | steal | roofline % | vs bitnet.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        s = r["tok_s"]
        roof = f"{r['roofline_pct']:.0f} % of {r['roofline_tok_s']:.1f}" if "roofline_pct" in r else "-"
        vs = f"{r['vs_bitnet_cpp']:.2f}x ({r['bitnet_cpp_tok_s']})" if "vs_bitnet_cpp" in r else "-"
        lines.append(f"| {r['test']} | {r['threads']} | {s['mean']:.2f} ± {s['sd']:.2f} | {s['median']:.2f} | "
                     f"{r['load']:.1f} | {fmt_steal(r)} | {roof} | {vs} |")
    db = res["decode_bytes"]
    tl2 = f" (TL2 weights: {res['tl2_source']})" if res.get("tl2_source") else ""
    memory = memory_note(res.get("weights_memory"), res["file_bytes"])
    lines += ["", f"- model load: {res['load_ms']:.0f} ms{tl2}{memory}"]
    if res["jit"]:
        c, w = res["jit"]["cold"], res["jit"]["cached"]
        lines.append(f"- JIT warm-up (first forwards of 1, 2, 3, 5 tokens minus the same forwards compiled): cold "
                     f"{c['jit_s']:.1f} s, cached {w['jit_s']:.1f} s; start to ready (import + load + first "
                     f"forwards): cold {c['ready_s']:.1f} s, cached {w['ready_s']:.1f} s")
    lines += [f"- peak RSS: {res['peak_rss_bytes'] / 2**30:.2f} GiB = {res['rss_ratio']:.2f} x (model file "
              f"{res['file_bytes'] / 2**30:.2f} GiB + KV cache {res['kv_bytes'] / 2**20:.0f} MiB)",
              "- memory bandwidth (read, this run): " + ", ".join(
                  f"{v:.1f} GB/s at {k} thread{'s' if int(k) > 1 else ''}" for k, v in res["bandwidth_gb_s"].items()),
              f"- bytes read per decoded token (depth 0): {db['total'] / gb:.3f} GB (ternary layers {db['layers'] / gb:.3f}, "
              f"head {db['head'] / gb:.3f} {db['head_type']}, KV {db['kv'] / gb:.4f})"]
    return "\n".join(lines)


def print_result(run, args, markdown_fn) -> int:
    """Run `run(args)` and print its result as JSON (args.json) or markdown_fn(result); errors the benchmarks
    expect (bad files, impossible settings) become one `error:` line on stderr and exit status 1."""
    from .gguf.reader import GGUFError
    try:
        res = run(args)
    except (RuntimeError, ValueError, OSError, GGUFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1) if args.json else markdown_fn(res))
    return 0
