# shellcheck shell=bash
# Shared helpers of the launch scripts (single_node.sh, multi_node.sh, slurm.sbatch); source it,
# do not run it. Each script then takes the same arguments:
#
#   --config FILE          the job's YAML config (required)
#   --fp8 [hybrid|e4m3]    FP8 training (format defaults to hybrid): appends the overrides
#                          precision.fp8=FORMAT model.spec=te (FP8 needs the Transformer Engine spec)
#   --dry-run              print the command (quoted, ready to copy-paste) instead of running it
#   key=value              an OmegaConf dotted override, passed to the job as is
#   -- ARG...              everything after -- is passed to the job as is
#   -h, --help             print the calling script's usage
#
# The job is `python -m tiedlora_megatron.finetune train --config FILE [key=value ...]`, started by
# torchrun (`$TORCHRUN`, default `torchrun`; it may be several words, e.g.
# TORCHRUN="python -m torch.distributed.run"). Environment variables the scripts set for the job
# are put in front of it with `env NAME=value ...`, so the printed command is the whole story.

LAUNCH_CONFIG=""
LAUNCH_FP8=""
LAUNCH_DRY_RUN=0
LAUNCH_OVERRIDES=()   # the job's overrides, the FP8 ones appended
LAUNCH_ENV=()         # NAME=value pairs put in front of the command with `env`
LAUNCH_JOB=()         # torchrun's script part: -m MODULE train --config FILE overrides...
LAUNCH_TORCHRUN=()    # $TORCHRUN split into words
LAUNCH_MODULE="tiedlora_megatron.finetune"
LAUNCH_NAME=${0##*/}

launch_die() {
  local line
  for line in "$@"; do
    printf '%s: error: %s\n' "$LAUNCH_NAME" "$line" >&2
  done
  exit 2
}

# Print the calling script's header comment (the block after the shebang and #SBATCH lines).
launch_usage() {
  local line started=0
  while IFS= read -r line; do
    case $line in
      '#!'* | '#SBATCH'*) continue ;;
      '#')
        ((started)) && printf '\n'
        ;;
      '# '*)
        started=1
        printf '%s\n' "${line#\# }"
        ;;
      *) ((started)) && break ;;
    esac
  done <"$0"
  return 0
}

launch_is_fp8_format() {
  [[ $1 == hybrid || $1 == e4m3 ]]
}

# Parse the common arguments into LAUNCH_CONFIG, LAUNCH_FP8, LAUNCH_DRY_RUN, LAUNCH_OVERRIDES,
# then build LAUNCH_JOB and LAUNCH_TORCHRUN.
launch_parse_args() {
  local arg
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --)
        LAUNCH_OVERRIDES+=("$@")
        break
        ;;
      --dry-run) LAUNCH_DRY_RUN=1 ;;
      --config)
        (($#)) || launch_die "--config needs a file"
        LAUNCH_CONFIG=$1
        shift
        ;;
      --config=*) LAUNCH_CONFIG=${arg#--config=} ;;
      --fp8)
        # The format is optional: take the next word only if it is not an option or override.
        if (($#)) && [[ $1 != -* && $1 != *=* ]]; then
          LAUNCH_FP8=$1
          shift
        else
          LAUNCH_FP8=hybrid
        fi
        ;;
      --fp8=*) LAUNCH_FP8=${arg#--fp8=} ;;
      -h | --help)
        launch_usage
        exit 0
        ;;
      -*) launch_die "unknown option '$arg' (job arguments other than key=value go after --)" ;;
      *=*) LAUNCH_OVERRIDES+=("$arg") ;;
      *) launch_die "unexpected argument '$arg' (overrides look like key=value; anything else goes after --)" ;;
    esac
  done
  [[ -n $LAUNCH_CONFIG ]] || launch_die "--config FILE is required (see --help)"
  if [[ -n $LAUNCH_FP8 ]]; then
    launch_is_fp8_format "$LAUNCH_FP8" \
      || launch_die "unknown FP8 format '$LAUNCH_FP8' (use hybrid or e4m3)"
    for arg in "${LAUNCH_OVERRIDES[@]}"; do
      case $arg in
        precision.fp8=*)
          [[ ${arg#*=} == "$LAUNCH_FP8" ]] \
            || launch_die "--fp8 $LAUNCH_FP8 conflicts with the override '$arg'"
          ;;
        model.spec=*)
          [[ ${arg#*=} == te ]] \
            || launch_die "--fp8 needs the Transformer Engine spec, but the overrides ask for '$arg'"
          ;;
      esac
    done
    LAUNCH_OVERRIDES+=("precision.fp8=$LAUNCH_FP8" "model.spec=te")
  fi
  # shellcheck disable=SC2034  # read by the scripts that source this file
  LAUNCH_JOB=(-m "$LAUNCH_MODULE" train --config "$LAUNCH_CONFIG" "${LAUNCH_OVERRIDES[@]}")
  read -r -a LAUNCH_TORCHRUN <<<"${TORCHRUN:-torchrun}"
  ((${#LAUNCH_TORCHRUN[@]})) || launch_die "TORCHRUN is set but empty"
}

launch_env_has() {
  local pair
  for pair in "${LAUNCH_ENV[@]}"; do
    [[ ${pair%%=*} == "$1" ]] && return 0
  done
  return 1
}

# launch_setenv NAME DEFAULT: give the job NAME=DEFAULT unless the caller's environment sets NAME;
# a caller's value wins, and an empty one (export NAME=) drops the default altogether.
launch_setenv() {
  local name=$1 default=$2
  launch_env_has "$name" && return 0
  if [[ -n ${!name+set} ]]; then
    [[ -z ${!name} ]] || LAUNCH_ENV+=("$name=${!name}")
  else
    LAUNCH_ENV+=("$name=$default")
  fi
}

# Settings for NCCL jobs on GPUs (megatron-core / Megatron-Bridge guidance):
# - CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue, so kernels run in launch order, which
#   megatron-core's TP / sequence-parallel communication overlap relies on (Hopper and older;
#   Blackwell ignores it). Set CUDA_DEVICE_MAX_CONNECTIONS= (empty) or >1 for FSDP, which must
#   not run with 1.
# - TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed or timed-out collective tears the process down,
#   so torchrun (and srun --kill-on-bad-exit) end the job instead of leaving it hung.
# - TORCH_NCCL_AVOID_RECORD_STREAMS=1: free NCCL buffers without recordStream (less memory).
# - NCCL_NVLS_ENABLE=0: no NVLink SHARP buffers (memory; and NVLS fails in some containers).
launch_gpu_env() {
  launch_setenv CUDA_DEVICE_MAX_CONNECTIONS 1
  launch_setenv TORCH_NCCL_ASYNC_ERROR_HANDLING 1
  launch_setenv TORCH_NCCL_AVOID_RECORD_STREAMS 1
  launch_setenv NCCL_NVLS_ENABLE 0
}

# Show the caller's network settings (every non-empty exported NCCL_* such as NCCL_IB_HCA or
# NCCL_SOCKET_IFNAME, and GLOO_SOCKET_IFNAME) in the command; the job inherits them anyway.
launch_passthrough_env() {
  local name names
  names=$(compgen -e | LC_ALL=C sort)
  while IFS= read -r name; do
    case $name in
      NCCL_* | GLOO_SOCKET_IFNAME) ;;
      *) continue ;;
    esac
    [[ -z ${!name} ]] || launch_env_has "$name" || LAUNCH_ENV+=("$name=${!name}")
  done <<<"$names"
}

# Number of GPUs this process may use: 0 without a working nvidia-smi, else the GPUs it lists,
# narrowed to CUDA_VISIBLE_DEVICES when that is set.
launch_count_gpus() {
  local out line n=0
  command -v nvidia-smi >/dev/null 2>&1 || {
    echo 0
    return 0
  }
  out=$(nvidia-smi -L 2>/dev/null) || {
    echo 0
    return 0
  }
  while IFS= read -r line; do
    [[ $line == 'GPU '* ]] && n=$((n + 1))
  done <<<"$out"
  if ((n > 0)) && [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    local -a visible
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    if ((${#visible[@]} == 0)) || [[ ${visible[0]} == -1 ]]; then
      n=0
    else
      n=${#visible[@]}
    fi
  fi
  echo "$n"
}

# launch_require_int NAME VALUE MIN: VALUE must be an integer >= MIN.
launch_require_int() {
  if [[ ! $2 =~ ^[0-9]+$ ]] || ((10#$2 < $3)); then
    launch_die "$1 must be an integer >= $3, got '$2'"
  fi
}

# A real run needs the config file where the job runs; a dry run does not look.
launch_check_config() {
  ((LAUNCH_DRY_RUN)) && return 0
  [[ -f $LAUNCH_CONFIG ]] || launch_die "config file '$LAUNCH_CONFIG' not found (from $PWD)"
}

# The Python that runs the pre-launch check (the job's own): $TIEDLORA_PYTHON, else TORCHRUN's
# first word when that is a python ("python -m torch.distributed.run"), else the interpreter on
# the torchrun script's #! line, else the python beside it, else python3. Sets LAUNCH_PYTHON.
LAUNCH_PYTHON=()
launch_find_python() {
  local launcher line
  if [[ -n ${TIEDLORA_PYTHON:-} ]]; then
    read -r -a LAUNCH_PYTHON <<<"$TIEDLORA_PYTHON"
    return 0
  fi
  if [[ ${LAUNCH_TORCHRUN[0]##*/} == python* ]]; then
    LAUNCH_PYTHON=("${LAUNCH_TORCHRUN[0]}")
    return 0
  fi
  launcher=$(command -v "${LAUNCH_TORCHRUN[0]}" 2>/dev/null || true)
  if [[ -n $launcher && -f $launcher ]]; then
    IFS= read -r line <"$launcher" || true
    if [[ $line == '#!'* ]]; then
      read -r -a LAUNCH_PYTHON <<<"${line#\#!}"
      [[ ${LAUNCH_PYTHON[0]:-} != */env ]] || LAUNCH_PYTHON=("${LAUNCH_PYTHON[@]:1}")
      if [[ ${LAUNCH_PYTHON[0]:-} == *python* ]] && command -v "${LAUNCH_PYTHON[0]}" >/dev/null; then
        return 0
      fi
    fi
    if [[ -x ${launcher%/*}/python ]]; then
      LAUNCH_PYTHON=("${launcher%/*}/python")
      return 0
    fi
  fi
  LAUNCH_PYTHON=(python3)
}

# launch_check NPROC [DELAY]: check the whole config for NPROC processes in one process before
# torchrun starts (`tiedlora-finetune show --check --nproc NPROC`: layout, optimizer values,
# data files, validation split size, output directory writability), so a mistake is one message
# in seconds rather than an error on every rank. On failure print the check's message and exit
# 2, after DELAY seconds (default 0): nodes other than the first wait, so that under
# `srun --kill-on-bad-exit` only the first node's copy of a shared mistake is printed. A dry run
# and TIEDLORA_SKIP_CHECK=1 skip the check.
launch_check() {
  local nproc=$1 delay=${2:-0} out status=0
  ((LAUNCH_DRY_RUN)) && return 0
  [[ ${TIEDLORA_SKIP_CHECK:-} == 1 ]] && return 0
  launch_find_python
  out=$(env ${LAUNCH_ENV[@]+"${LAUNCH_ENV[@]}"} PYTHONWARNINGS=ignore "${LAUNCH_PYTHON[@]}" \
    -m "$LAUNCH_MODULE" show --check --nproc "$nproc" --config "$LAUNCH_CONFIG" \
    ${LAUNCH_OVERRIDES[@]+"${LAUNCH_OVERRIDES[@]}"} 2>&1) || status=$?
  ((status == 0)) && return 0
  ((delay > 0)) && sleep "$delay"
  if ((status == 2)) && [[ -n $out ]]; then
    printf '%s\n' "$out" >&2
    exit 2
  fi
  launch_die "the config check (${LAUNCH_PYTHON[*]} -m $LAUNCH_MODULE show --check) failed" \
    "with status $status (set TIEDLORA_PYTHON to the job's python, or TIEDLORA_SKIP_CHECK=1):" \
    "${out:-no output}"
}

launch_print_cmd() {
  local line
  printf -v line '%q ' "$@"
  printf '%s\n' "${line% }"
}

# launch_exec CMD...: prefix LAUNCH_ENV with `env`, then print the command (--dry-run) or echo it
# to stderr and exec it.
launch_exec() {
  local -a cmd=()
  ((${#LAUNCH_ENV[@]} == 0)) || cmd=(env "${LAUNCH_ENV[@]}")
  cmd+=("$@")
  if ((LAUNCH_DRY_RUN)); then
    launch_print_cmd "${cmd[@]}"
    exit 0
  fi
  printf '+ ' >&2
  launch_print_cmd "${cmd[@]}" >&2
  exec "${cmd[@]}"
}
