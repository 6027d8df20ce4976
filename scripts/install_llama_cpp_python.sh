#!/usr/bin/env bash
# Install the CI parity peer: upstream llama.cpp through llama-cpp-python, built from the PyPI sdist by pip.
#
# The compiled wheel is kept in a wheel directory (default ~/.cache/bitnet-py/wheels) and reused on later runs:
# a warm run is a plain `pip install` of that file (seconds); a cold run (fresh machine) compiles llama.cpp
# (about 10-15 minutes on 2 cores) and stores the wheel for the next run.
#
#   scripts/install_llama_cpp_python.sh            # install (build if no cached wheel)
#   LLAMA_CPP_WHEEL_DIR=/some/dir scripts/...      # another cache directory (e.g. one CI restores)
#   LLAMA_CPP_SKIP=1 scripts/...                   # do nothing (the peer tests then skip with a reason)
#
# Build flags: CPU only, no multimodal library (LLAVA_BUILD=OFF: the tests never import llama_cpp.mtmd_cpp),
# and a fixed x86-64 AVX2 instruction set instead of -march=native so a cached wheel also runs on another
# AVX2 CPU of the same machine kind. On a CPU without AVX2 set LLAMA_CPP_CMAKE_ARGS yourself.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEEL_DIR="${LLAMA_CPP_WHEEL_DIR:-$HOME/.cache/bitnet-py/wheels}"
PY="${PYTHON:-python3}"

if [ "${LLAMA_CPP_SKIP:-0}" = "1" ]; then
  echo "llama-cpp-python: LLAMA_CPP_SKIP=1, not installing"; exit 0
fi

installed="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)"
if [ "$installed" = "$VERSION" ]; then
  echo "llama-cpp-python $VERSION already installed"; exit 0
fi

mkdir -p "$WHEEL_DIR"
wheel="$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
  echo "llama-cpp-python $VERSION: no cached wheel in $WHEEL_DIR, compiling from the PyPI sdist (slow, once)"
  default_args="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
  default_args+=" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  start=$(date +%s)
  CMAKE_ARGS="${LLAMA_CPP_CMAKE_ARGS:-$default_args}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    nice -n "${LLAMA_CPP_NICE:-10}" "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python \
      --no-cache-dir -w "$WHEEL_DIR" "llama-cpp-python==$VERSION"
  echo "llama-cpp-python $VERSION: built in $(( $(date +%s) - start )) s"
  wheel="$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)"
fi
"$PY" -m pip install --quiet --disable-pip-version-check "$wheel"
echo "llama-cpp-python $VERSION installed from $wheel"
