#!/usr/bin/env bash
# Usage: launch/multi_node.sh --config FILE [--fp8 [hybrid|e4m3]] [--dry-run] [key=value ...] [-- ARG ...]
#
# Start this node's part of a multi-node Tied-LoRA fine-tuning job; run it once on every node
# with the same arguments and environment except NODE_RANK:
#   torchrun --nnodes $NNODES --node-rank $NODE_RANK --rdzv-backend c10d
#            --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $JOB_ID --nproc-per-node $NPROC
#            -m tiedlora_megatron.finetune train --config FILE ...
# (With the c10d rendezvous torch numbers the nodes itself; NODE_RANK is passed for the record.)
#
# Environment (required):
#   NNODES       number of nodes
#   NODE_RANK    this node's index, 0 .. NNODES-1 (default under srun: SLURM_PROCID)
#   MASTER_ADDR  host name or IP of node 0, reachable from every node (it hosts the rendezvous)
#   JOB_ID       rendezvous id, the same on every node (default: SLURM_JOB_ID)
# Environment (optional):
#   MASTER_PORT  rendezvous port on MASTER_ADDR (default 29500)
#   NPROC        ranks per node, one per GPU (default 8)
#   TORCHRUN     launcher command (default: torchrun; e.g. "python -m torch.distributed.run")
#   TIEDLORA_PYTHON  the job's python for the config check run before torchrun (default: the
#                one torchrun runs on); TIEDLORA_SKIP_CHECK=1 skips the check;
#                TIEDLORA_CHECK_GRACE seconds (default 30) a node other than 0 waits before
#                reporting a failed check (node 0 reports a mistake they share)
#   Given to the job unless already set (an empty value drops it):
#   CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron's TP / sequence-parallel comm overlap; FSDP needs
#   it unset or >1), TORCH_NCCL_ASYNC_ERROR_HANDLING=1, TORCH_NCCL_AVOID_RECORD_STREAMS=1,
#   NCCL_NVLS_ENABLE=0.
#   Passed through (and shown in the printed command): every NCCL_* (NCCL_IB_HCA,
#   NCCL_SOCKET_IFNAME, NCCL_DEBUG, ...) and GLOO_SOCKET_IFNAME.
#
# Example (node 1 of 2):
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node001 JOB_ID=ft1 NCCL_SOCKET_IFNAME=ib0 \
#     launch/multi_node.sh --config my.yaml --fp8 parallel.tp=8
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

launch_parse_args "$@"

NODE_RANK=${NODE_RANK:-${SLURM_PROCID:-}}
JOB_ID=${JOB_ID:-${SLURM_JOB_ID:-}}
MASTER_PORT=${MASTER_PORT:-29500}
nproc=${NPROC:-8}

declare -A required=(
  [NNODES]="the number of nodes"
  [NODE_RANK]="this node's index, 0 .. NNODES-1 (under srun it defaults to SLURM_PROCID)"
  [MASTER_ADDR]="host name or IP of node 0, reachable from every node"
  [JOB_ID]="the rendezvous id, the same on every node (defaults to SLURM_JOB_ID)"
)
missing=()
for name in NNODES NODE_RANK MASTER_ADDR JOB_ID; do
  [[ -n ${!name:-} ]] || missing+=("missing required environment variable $name: ${required[$name]}")
done
((${#missing[@]} == 0)) || launch_die "${missing[@]}"

launch_require_int NNODES "$NNODES" 1
launch_require_int NODE_RANK "$NODE_RANK" 0
((10#$NODE_RANK < 10#$NNODES)) || launch_die "NODE_RANK=$NODE_RANK is not below NNODES=$NNODES"
launch_require_int MASTER_PORT "$MASTER_PORT" 1
launch_require_int NPROC "$nproc" 1

launch_gpu_env
launch_passthrough_env
launch_check_config
# Every node checks the whole job; a mistake they share is printed by node 0 only (srun ends the
# others when it exits), one only a later node sees is printed by that node after a grace delay.
launch_require_int TIEDLORA_CHECK_GRACE "${TIEDLORA_CHECK_GRACE:=30}" 0
if ((10#$NODE_RANK == 0)); then
  launch_check $((10#$NNODES * 10#$nproc))
else
  launch_check $((10#$NNODES * 10#$nproc)) "$TIEDLORA_CHECK_GRACE"
fi

launch_exec "${LAUNCH_TORCHRUN[@]}" \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID" \
  --nproc-per-node "$nproc" \
  "${LAUNCH_JOB[@]}"
