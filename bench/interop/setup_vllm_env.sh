#!/usr/bin/env bash
# Builds the separate environment bench/interop/vllm_omni_load.py runs in: CPU torch first, then
# vllm and vllm-omni without their dependency trees (CUDA kernels, servers, audio stacks), then
# exactly the packages their imports need on a CPU (vllm-requirements.txt), then omni-fp8 itself.
# Usage: bash bench/interop/setup_vllm_env.sh [VENV]   (default .bench/vllm-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.bench/vllm-venv}
VLLM_VERSION=0.30.0
VLLM_OMNI_VERSION=0.30.0

python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps -r bench/interop/vllm-requirements.txt
python -m pip install -q --no-deps "vllm==$VLLM_VERSION" "vllm-omni==$VLLM_OMNI_VERSION"
python -m pip install -q --no-deps -e .
python - <<'PY'
from importlib.metadata import version
print("vllm", version("vllm"), "| vllm-omni", version("vllm-omni"), "| torch", version("torch"),
      "| diffusers", version("diffusers"), "| transformers", version("transformers"))
PY
