#!/usr/bin/env bash
# The 1B comparison on one GPU host with no package registry (an H200: Python 3.12, torch 2.11,
# transformers and peft installed; megatron-core brought as a wheel, see benchmarks/README.md).
# Budget: under 8 minutes, install included; the table is printed last.
# Not yet run on a GPU: the CPU path of the same script is what has been exercised.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS="${WHEELS:-benchmarks/gpu/wheels}"
OUT="${OUT:-benchmarks/results/h200_1b_bf16}"

if ! python -c "import megatron.core" 2>/dev/null; then
    python -m pip install --no-index --no-deps --find-links "$WHEELS" "megatron-core==0.16.1"
fi
python -c "import transformers, peft, torch; assert torch.cuda.is_available()" || {
    echo "needs a CUDA torch with transformers and peft installed" >&2
    exit 1
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$OUT")"

# megatron: floor, full fine-tuning, LoRA, VeRA, vBuA, tied BA; HF: floor, PEFT LoRA, PEFT VeRA.
# 2 rounds x 10 timed steps of 8192 tokens each; the whole run is capped at 7 minutes.
timeout 420 python benchmarks/bench.py \
    --model 1b --device cuda --dtype bf16 --seq-len 2048 --micro-batch 4 \
    --rank 8 --alpha 16 --targets linear_qkv,linear_proj,linear_fc1,linear_fc2 \
    --hf-peers --rounds 2 --warmup 3 --steps 10 --out "$OUT" --plot
