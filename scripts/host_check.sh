#!/usr/bin/env bash
# Check a new host in one command, sized for a short machine lease (92 s on 2 cores with the kernels cached; about a
# minute more to compile them on a fresh host):
#  1. what it is: CPU, the SIMD features the kernels use (AVX2, F16C, VNNI), numba and numpy versions;
#  2. does it compute bitnet.cpp's outputs: the kernel, rope, attention and parity tests (pytest; needs
#     ../shared/fixtures; in parallel where pytest-xdist is installed);
#  3. how prefill and decode scale with threads: the bench on the 2B-4T layout (a dummy model is generated first
#     unless MODEL names one), greedy (the server's path), threads 1, 2, 4, ... up to all cores.
# Each step has its own time limit and writes its output as it goes, so a lease that ends early still returns what
# ran. Usage: bash scripts/host_check.sh [OUT_DIR]   (default out/host-check)
# Environment: MODEL (a GGUF), THREADS ("1 2 16"), TESTS_TIMEOUT (s, 240), BENCH_TIMEOUT (s, 300), PYTHON (python3).
set -u
cd "$(dirname "$0")/.."
out=${1:-out/host-check}
mkdir -p "$out"
log="$out/log.txt"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
say() { echo "== [${SECONDS} s] $*" | tee -a "$log"; }

say "host"
{
  lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)|Thread|Socket|NUMA node\(|L2|L3" || true
  "$py" -c "import numba, numpy; from kernels.simd import HAVE_AVX2, HAVE_AVX512, HAVE_F16C, HAVE_VNNI
from kernels.amx import HAVE_AMX
from kernels.b3_simd import HAVE_B3
print('numba', numba.__version__, 'numpy', numpy.__version__)
print('AVX2', HAVE_AVX2, 'F16C', HAVE_F16C, 'VNNI (vpdpbusd dots)', HAVE_VNNI, 'AVX-512 (zmm screen)', HAVE_AVX512,
      'AMX (prefill tiles)', HAVE_AMX, 'B3 (base-3 weights, VBMI)', HAVE_B3)"
} 2>&1 | tee -a "$log"

say "tests: kernels and parity with bitnet.cpp / transformers"
parallel=()
if "$py" -c "import xdist" 2>/dev/null; then
  n=$(nproc); parallel=(-n $(( n < 8 ? n : 8 )))
fi
timeout "${TESTS_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
  tests/test_kernels.py tests/test_kernels_rowwise.py tests/test_q8k.py tests/test_lut_matmul.py tests/test_tasks.py \
  tests/test_rope_tables.py tests/test_host_independence.py tests/test_attention_simd.py tests/test_simd_avx512.py \
  tests/test_amx.py tests/test_b3.py \
  tests/test_attention_split.py tests/test_layer_steps.py tests/test_parity_bitnetcpp.py \
  tests/test_parity_transformers.py 2>&1 | tail -25 | tee -a "$log"

model=${MODEL:-out/2b4t-i2s.gguf}
if [ ! -e "$model" ]; then
  say "dummy model at the 2B-4T layout -> $model"
  mkdir -p "$(dirname "$model")"
  "$py" -m bitnet_py.dummy --layout 2b-4t --type i2_s --seed 1 -o "$model" 2>&1 | tail -1 | tee -a "$log"
fi

threads=${THREADS:-}
if [ -z "$threads" ]; then
  n=$(nproc); t=1
  while [ "$t" -lt "$n" ]; do threads="$threads $t"; t=$(( t * 2 )); done
  threads="$threads $n"
fi
list=$(echo $threads | tr ' ' ',')
say "bench: threads $list, greedy, pp128 and tg32, 3 runs each"
timeout "${BENCH_TIMEOUT:-300}" "$py" -m bitnet_py bench -m "$model" -p 128 -n 32 -t "$list" -r 3 --no-jit \
  --logits greedy 2>&1 | grep -v "^\s*$" | tee -a "$log"
say "done: $log"
