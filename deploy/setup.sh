#!/usr/bin/env bash
# Setup step shared by the deploy/*.yaml SkyPilot tasks; runs in the workdir (the repo root).
#  1. Install bitnet-py with pip from wheels only (--only-binary=:all:, so nothing is ever compiled:
#     numpy / numba / llvmlite / tokenizers all ship manylinux wheels). BITNET_PY_SKIP_INSTALL=1 skips it
#     (local rehearsal, images that already have the project installed).
#  2. Fetch MODEL_REPO for QUANT_TYPE: a GGUF is downloaded into the Hugging Face cache; a safetensors-only
#     repo is downloaded and converted once into ~/.cache/bitnet-py (or $BITNET_PY_CACHE). The `run` step
#     then resolves the same model offline from these caches. A CACHE_VERSION different from the one of
#     the previous setup on this machine re-downloads / re-converts (--force).
# Gated or private repos: pass the token with `sky launch ... --secret HF_TOKEN`.
set -euo pipefail

MODEL_REPO="${MODEL_REPO:-microsoft/BitNet-b1.58-2B-4T}"
QUANT_TYPE="${QUANT_TYPE:-i2_s}"
CACHE_VERSION="${CACHE_VERSION:-1}"
PYTHON="$(command -v python || command -v python3)"
STATE_DIR="${BITNET_PY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bitnet-py}"
mkdir -p "$STATE_DIR"

if [ "${BITNET_PY_SKIP_INSTALL:-0}" != "1" ]; then
  echo "bitnet-py setup: installing the project with $PYTHON ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m pip install --quiet --upgrade pip
  "$PYTHON" -m pip install --only-binary=:all: .
else
  echo "bitnet-py setup: BITNET_PY_SKIP_INSTALL=1, not installing"
fi

stamp="$STATE_DIR/deploy-cache-version"
force=()
if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$CACHE_VERSION" ]; then
  echo "bitnet-py setup: CACHE_VERSION changed ($(cat "$stamp") -> $CACHE_VERSION), rebuilding the model cache"
  force=(--force)
fi

echo "bitnet-py setup: fetching $MODEL_REPO ($QUANT_TYPE)"
model_path="$("$PYTHON" -m bitnet_py.hub "$MODEL_REPO" --quant-type "$QUANT_TYPE" \
  --cache-version "$CACHE_VERSION" ${force[@]+"${force[@]}"})"
echo "$CACHE_VERSION" > "$stamp"
echo "bitnet-py setup: model ready at $model_path"
