#!/usr/bin/env bash
# The main job: set up .venv, then fine-tune with Tied-LoRA under torchrun on 2 CPU ranks (TP=2).
# Extra arguments go to the job (see examples/finetune_tiny_gpt.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test}" bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/torchrun --nproc-per-node "${NPROC:-2}" examples/finetune_tiny_gpt.py --tp "${NPROC:-2}" "$@"
