#!/usr/bin/env bash
# The main job: set up .venv, fetch SQuAD v1.1 once, then fine-tune the offline SmolLM2-135M with
# Tied-LoRA (vBuA) on it under torchrun on CPU, and print base vs tuned exact match / F1 on held-out
# questions and the trainable-parameter count against LoRA's.
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh train.steps=10`.
# VENV chooses the environment (default: .venv; see scripts/setup_env.sh). The set-up is skipped
# when nothing changed since the last one, so a rerun reaches the job in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-models}" VENV="$VENV" bash scripts/setup_env.sh
VENV_BIN=$(cd "$VENV/bin" && pwd)
# One process fetches the data (a 358 MB download the first time, with progress lines; cached
# afterwards).
"$VENV_BIN/python" -c "from tiedlora_megatron.data import squad_json; print('SQuAD v1.1:', squad_json())"
export PATH="$VENV_BIN:$PATH"
export NPROC="${NPROC:-2}"
exec bash launch/single_node.sh --config examples/configs/smollm2_squad.yaml "$@"
