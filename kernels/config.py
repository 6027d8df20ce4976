"""One place for Numba compilation flags and kernel choices used by every kernel.

Environment:
- NUMBA_CACHE_DIR: where compiled kernels are cached (Numba's own variable; default `__pycache__` next to the
  kernel files). A second start loads them from there instead of compiling. The cache goes into a subfolder
  named after a hash of every kernels/*.py source (`kernel-cache-<hash>`): Numba keys each cached function on
  its own file only, yet kernels inline intrinsics and helpers from other files (simd.py, attention_fast.py);
  without the hash, editing one of those (or a `git pull` that touches only it) would keep running stale
  compiled code. Folders of older sources are left in place (delete them freely).
- BITNET_PY_NO_CACHE=1: disables the on-disk cache.
- BITNET_PY_TERNARY_KERNEL: `auto` (default: per-shape choice in kernels/select.py), `mad` (multiply-add:
  SIMD where the host has AVX2, else plain loops), `plain` (plain multiply-add loops), `lut` (table lookup).
- BITNET_PY_FAST_ATTENTION=0: use kernels/attention.py instead of kernels/attention_fast.py.
- BITNET_PY_FUSE=0: run q/k/v and gate/up as separate matmuls instead of one fused parallel region.
- BITNET_PY_LAYER_STEPS=0: run every layer through the model's general per-kernel path instead of
  kernels.layer_steps (two compiled calls per layer; same results).
- BITNET_PY_LAYER_REGION=0: run a one-token decode step's layers as ~150 parallel regions
  (kernels.layer_steps.decode_layers) instead of one (kernels.layer_region; same results).
- BITNET_PY_VNNI=0: ternary dots without `vpdpbusd` on hosts that have VNNI (for comparisons; same results).
  Kernels compiled this way are cached in their own folder (`kernel-cache-<hash>-novnni`).
- BITNET_PY_B3=0: keep ternary weights in I2_S's 2-bit layout on hosts with AVX-512 VBMI + VNNI, instead of
  repacking them at load to 1.6 bits per weight (kernels/b3_simd.py; same results). Cached in
  `kernel-cache-<hash>-nob3`.
- BITNET_PY_AVX512=0: the screened head's dot in its 256-bit form on hosts that have AVX-512 BW + VNNI
  (kernels/simd_avx512.py; same results). Cached in `kernel-cache-<hash>-noavx512`.
- OpenMP waiting (numba's `omp` threading layer, GNU libgomp): a decode step runs ~150 short parallel regions,
  and by default libgomp's idle threads spin ~300k iterations between them. When the cores are shared
  (other processes, the server's own Python threads) a spinning thread holds the core that the thread still
  working needs: 2-thread decode on a loaded 2-vCPU box measured 0.9 tok/s default vs 5.5 tok/s with
  OMP_WAIT_POLICY=PASSIVE. Unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT, we set GOMP_SPINCOUNT=10000
  (spin ~0.15 ms, then sleep): cheap between back-to-back regions, polite otherwise. Shared cores:
  OMP_WAIT_POLICY=PASSIVE. Dedicated cores (a VM that runs only the server: deploy/gcp_*.yaml, service.yaml):
  GOMP_SPINCOUNT=1000000 (~15 ms), so that the workers stay awake through a step's Python (the head's candidate
  rows, sampling, scheduling: a few ms, after which a sleeping vCPU must be woken and finds its caches cold).
  On a 2-vCPU Intel Xeon VM (pause takes longer there than on Zen 3), greedy 2B-4T decode (`python -m bitnet_py
  bench -m out/2b4t-i2s.gguf -p 16 -n 64 -t 2 -r 3 --no-jit --logits greedy`, alternated processes) gave 18.24 /
  19.00 / 19.83 / 20.27 tok/s (medians of 3) with GOMP_SPINCOUNT 10000 / 100000 / 300000 / 1000000 on idle
  cores, 1.04-1.27x for 1000000 over 10000 in 7 of 7 pairs; with one busy process beside it, 7.69 / 4.65 / 6.36
  tok/s (10000 / 300000 / 1000000, one round): the default stays polite. Most of that gap was the faster thread
  falling asleep while it waited at the end of a region for the slower one: since the matmuls and the screen
  hand out tasks dynamically (kernels.tasks.next_task) it is 1.00-1.04x (3 pairs, 20.43-20.66 tok/s). Before
  that change, a server on the same box with its load generator (`scripts/benchmark_throughput.py --concurrency 4
  --duration 30 --stream`) gave 19.9 / 24.3 output tok/s with 10000 and 25.5 / 24.4 with 1000000. Older code:
  64.8 / 67.3 / 72 ms per step with 1000000 / 100000 / 10000, and 328 / 199 / 149 ms with 100000 / 10000 /
  PASSIVE beside two busy processes.
Only "safe" fast-math flags are used where float results must match the reference order of operations:
`STRICT` kernels (activation quantization, norms) get none, reductions over exact integers don't care.
"""
import hashlib
import os
from pathlib import Path

import numba

POLITE_SPIN_COUNT = "10000"
USER_OPENMP_WAIT = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
if not USER_OPENMP_WAIT:
    os.environ["GOMP_SPINCOUNT"] = POLITE_SPIN_COUNT  # read when libgomp starts (first parallel kernel call)


def openmp_wait() -> str:
    """How idle OpenMP threads wait, as set in this process's environment (for benchmark reports)."""
    settings = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    return " ".join(settings) + ("" if USER_OPENMP_WAIT else " (polite default)")

CACHE = os.environ.get("BITNET_PY_NO_CACHE", "") not in ("1", "true", "yes")
_KERNEL_DIR = Path(__file__).resolve().parent


def source_hash(directory: Path) -> str:
    """Hash of the names and contents of the *.py files in directory."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


USE_VNNI = os.environ.get("BITNET_PY_VNNI", "1") not in ("0", "false", "no")
USE_AVX512 = USE_VNNI and os.environ.get("BITNET_PY_AVX512", "1") not in ("0", "false", "no")
USE_AMX = os.environ.get("BITNET_PY_AMX", "1") not in ("0", "false", "no")  # kernels/amx.py (prefill)
USE_B3 = os.environ.get("BITNET_PY_B3", "1") not in ("0", "false", "no")  # kernels/b3_simd.py (base-3 weights)
SOURCE_HASH = source_hash(_KERNEL_DIR)
CACHE_DIR = os.path.join(os.environ.get("NUMBA_CACHE_DIR") or str(_KERNEL_DIR / "__pycache__"),
                         f"kernel-cache-{SOURCE_HASH}" + ("" if USE_VNNI else "-novnni")
                         + ("" if USE_AVX512 or not USE_VNNI else "-noavx512") + ("" if USE_AMX else "-noamx")
                         + ("" if USE_B3 else "-nob3"))
if CACHE:
    numba.config.CACHE_DIR = CACHE_DIR  # read when each @njit(cache=True) below is decorated
TERNARY_KERNEL = os.environ.get("BITNET_PY_TERNARY_KERNEL", "auto")
FAST_ATTENTION = os.environ.get("BITNET_PY_FAST_ATTENTION", "1") not in ("0", "false", "no")
FUSE = os.environ.get("BITNET_PY_FUSE", "1") not in ("0", "false", "no")
LAYER_STEPS = os.environ.get("BITNET_PY_LAYER_STEPS", "1") not in ("0", "false", "no")
LAYER_REGION = os.environ.get("BITNET_PY_LAYER_REGION", "1") not in ("0", "false", "no")
# Flags allowing vectorized reductions without reciprocal/approximate math (keeps divisions exact). The order
# of such a sum is LLVM's choice per host (8 lanes on AVX2, 16 on Genoa), so results that must be the same bits
# on every host never use them: only the screened head's rounded-up error bounds (kernels/dense.py), the f16
# head on hosts without float16 conversion hardware, and the bandwidth probe (kernels/membw.py) do.
FASTMATH_REDUCE = {"reassoc", "nsz", "contract"}
FASTMATH_OFF = False

JIT = dict(cache=CACHE, nogil=True, fastmath=FASTMATH_OFF)
JIT_PARALLEL = dict(cache=CACHE, nogil=True, parallel=True, fastmath=FASTMATH_OFF)
JIT_REDUCE_PARALLEL = dict(cache=CACHE, nogil=True, parallel=True, fastmath=FASTMATH_REDUCE)
