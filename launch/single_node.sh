#!/usr/bin/env bash
# Usage: launch/single_node.sh --config FILE [--fp8 [hybrid|e4m3]] [--dry-run] [key=value ...] [-- ARG ...]
#
# Run the Tied-LoRA fine-tuning job on this machine:
#   torchrun --standalone --nproc-per-node N -m tiedlora_megatron.finetune train --config FILE ...
#
# With GPUs (nvidia-smi lists some): N = the GPUs visible (CUDA_VISIBLE_DEVICES narrows them), and
# the job gets CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# TORCH_NCCL_AVOID_RECORD_STREAMS=1 NCCL_NVLS_ENABLE=0 unless already set.
# Without (CPU, gloo): N = 2 and OMP_NUM_THREADS=1 unless already set.
#
# Environment:
#   NPROC      ranks to start (default: the GPU count, or 2 on CPU)
#   TORCHRUN   launcher command (default: torchrun; e.g. "python -m torch.distributed.run")
#   TIEDLORA_PYTHON  the job's python, for the config check run before torchrun (default: the
#              one torchrun runs on); TIEDLORA_SKIP_CHECK=1 skips that check
#   NCCL_*, GLOO_SOCKET_IFNAME   passed through (and shown in the printed command)
#
# Examples:
#   launch/single_node.sh --config examples/configs/tiny_gpt.yaml train.steps=100
#   NPROC=4 launch/single_node.sh --config my.yaml --fp8 parallel.tp=4 --dry-run
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

launch_parse_args "$@"

gpus=$(launch_count_gpus)
if ((gpus > 0)); then
  nproc=${NPROC:-$gpus}
  launch_gpu_env
else
  nproc=${NPROC:-2}
  if [[ -n $LAUNCH_FP8 ]] && ((!LAUNCH_DRY_RUN)); then
    launch_die "--fp8 needs GPUs (Hopper or newer), and none is visible here"
  fi
  launch_setenv OMP_NUM_THREADS 1
fi
launch_require_int NPROC "$nproc" 1
launch_passthrough_env
launch_check_config
launch_check "$nproc"

launch_exec "${LAUNCH_TORCHRUN[@]}" --standalone --nproc-per-node "$nproc" "${LAUNCH_JOB[@]}"
