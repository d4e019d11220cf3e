"""The launch scripts in launch/: the commands they build (checked exactly through --dry-run), their
environment handling and errors, the whole SLURM chain (sbatch -> srun -> multi_node.sh ->
torchrun) run through stubs, and one real CPU run of the fine-tuning job.

Every script runs under bash in a clean environment whose PATH starts with a directory of stubs:
`nvidia-smi` (fails, i.e. no GPU, unless a test lists some) and `scontrol`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("single_node.sh", "multi_node.sh", "slurm.sbatch")
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="the launch scripts need bash")

CFG = ("--config", "cfg.yaml")
JOB = "-m tiedlora_megatron.finetune train --config cfg.yaml"
GPU_ENV = (
    "CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 "
    "TORCH_NCCL_AVOID_RECORD_STREAMS=1 NCCL_NVLS_ENABLE=0"
)
MULTI_ENV = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node001", "JOB_ID": "ft1"}
RDZV = "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint node001:29500 --rdzv-id ft1"
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "node[001-002]",
    "SLURM_NNODES": "2",
    "SLURM_PROCID": "0",
}
SLURM_PREFIX = (
    "env MASTER_ADDR=node001 MASTER_PORT=29500 NNODES=2 NPROC=8 JOB_ID=4242 "
    "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 "
    f"bash {LAUNCH}/multi_node.sh --config cfg.yaml"
)
FOUR_GPUS = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(4))


def _stub(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    _stub(directory, "nvidia-smi", "exit 9\n")
    _stub(
        directory,
        "scontrol",
        '[ "$1 $2" = "show hostnames" ] || exit 1\nprintf "node001\\nnode002\\n"\n',
    )
    # The python beside the stub torchruns, which the scripts run the config check with: it
    # records its arguments and passes.
    _stub(directory, "python", f'echo "$*" >> "{directory}/python.log"\n')
    return directory


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    directory = tmp_path / "work"
    directory.mkdir()
    (directory / "cfg.yaml").write_text("# a stand-in config\n")
    return directory


def _run(
    script: str | Path, *args: str, stubs: Path, cwd: Path, **env: str
) -> subprocess.CompletedProcess:
    script_path = script if isinstance(script, Path) else LAUNCH / script
    full_env = {
        "PATH": f"{stubs}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(cwd),
        "LC_ALL": "C",
        **env,
    }
    return subprocess.run(
        [BASH, str(script_path), *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _dry(script: str, *args: str, stubs: Path, cwd: Path, **env: str) -> str:
    result = _run(script, "--dry-run", *args, stubs=stubs, cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return lines[0]


def _fails(script: str, *args: str, stubs: Path, cwd: Path, **env: str) -> str:
    result = _run(script, *args, stubs=stubs, cwd=cwd, **env)
    assert result.returncode != 0
    assert result.stdout == ""
    return result.stderr


def _env_for(script: str) -> dict[str, str]:
    return {"multi_node.sh": MULTI_ENV, "slurm.sbatch": SLURM_ENV}.get(script, {})


# --- the scripts themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("script", [*SCRIPTS, "common.sh"])
def test_scripts_parse_and_run_ones_are_executable(script):
    path = LAUNCH / script
    assert subprocess.run([BASH, "-n", str(path)], capture_output=True).returncode == 0
    first = path.read_text().splitlines()[0]
    if script == "common.sh":
        assert first == "# shellcheck shell=bash"
    else:
        assert first == "#!/usr/bin/env bash"
        assert os.access(path, os.X_OK)
        assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage_header(script, stubs, workdir):
    result = _run(script, "--help", stubs=stubs, cwd=workdir)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ")
    assert "--config FILE" in result.stdout
    assert "#SBATCH" not in result.stdout


# --- single node -----------------------------------------------------------------------------------


def test_single_node_cpu(stubs, workdir):
    line = _dry("single_node.sh", *CFG, "train.steps=3", stubs=stubs, cwd=workdir)
    assert line == (
        f"env OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 {JOB} train.steps=3"
    )


@pytest.mark.parametrize(
    ("fp8_args", "fmt"),
    [(["--fp8"], "hybrid"), (["--fp8", "hybrid"], "hybrid"), (["--fp8=e4m3"], "e4m3")],
)
def test_single_node_cpu_fp8(fp8_args, fmt, stubs, workdir):
    line = _dry(
        "single_node.sh",
        *CFG,
        *fp8_args,
        "train.steps=3",
        stubs=stubs,
        cwd=workdir,
    )
    assert line == (
        "env OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 "
        f"{JOB} train.steps=3 precision.fp8={fmt} model.spec=te"
    )


def test_single_node_cpu_nproc_and_callers_env(stubs, workdir):
    line = _dry(
        "single_node.sh",
        *CFG,
        stubs=stubs,
        cwd=workdir,
        NPROC="3",
        OMP_NUM_THREADS="4",
        GLOO_SOCKET_IFNAME="lo",
    )
    assert line == (
        "env OMP_NUM_THREADS=4 GLOO_SOCKET_IFNAME=lo torchrun --standalone --nproc-per-node 3 "
        f"{JOB}"
    )


def test_single_node_gpus(stubs, workdir):
    _stub(stubs, "nvidia-smi", FOUR_GPUS)
    line = _dry("single_node.sh", *CFG, "--fp8", stubs=stubs, cwd=workdir)
    assert line == (
        f"env {GPU_ENV} torchrun --standalone --nproc-per-node 4 "
        f"{JOB} precision.fp8=hybrid model.spec=te"
    )
    line = _dry(
        "single_node.sh",
        *CFG,
        stubs=stubs,
        cwd=workdir,
        CUDA_VISIBLE_DEVICES="1,3",
        CUDA_DEVICE_MAX_CONNECTIONS="8",
        NCCL_NVLS_ENABLE="",
    )
    assert line == (
        "env CUDA_DEVICE_MAX_CONNECTIONS=8 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 "
        f"TORCH_NCCL_AVOID_RECORD_STREAMS=1 torchrun --standalone --nproc-per-node 2 {JOB}"
    )
    # CUDA_VISIBLE_DEVICES="" hides every GPU: the CPU setup.
    line = _dry(
        "single_node.sh",
        *CFG,
        stubs=stubs,
        cwd=workdir,
        CUDA_VISIBLE_DEVICES="",
    )
    assert line == f"env OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 {JOB}"


def test_single_node_fp8_without_gpu_fails_for_real(stubs, workdir):
    stderr = _fails("single_node.sh", *CFG, "--fp8", stubs=stubs, cwd=workdir)
    assert "--fp8 needs GPUs" in stderr


def test_single_node_execs_with_the_env(stubs, workdir):
    torchrun = _stub(
        stubs,
        "fake-torchrun",
        'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"\nfor a in "$@"; do echo "arg:$a"; done\n',
    )
    result = _run(
        "single_node.sh",
        *CFG,
        "run.name=my run",
        "--",
        "a 'b'",
        stubs=stubs,
        cwd=workdir,
        TORCHRUN=str(torchrun),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "OMP_NUM_THREADS=1",
        *(f"arg:{a}" for a in ["--standalone", "--nproc-per-node", "2", *JOB.split()]),
        "arg:run.name=my run",
        "arg:a 'b'",
    ]
    assert result.stderr.startswith(f"+ env OMP_NUM_THREADS=1 {torchrun} --standalone")
    # The config was checked first, in one process, for the 2 ranks about to start.
    assert (stubs / "python.log").read_text() == (
        "-m tiedlora_megatron.finetune show --check --nproc 2 --config cfg.yaml "
        "run.name=my run a 'b'\n"
    )


def test_single_node_checks_the_config_for_real(stubs, workdir):
    stderr = _fails("single_node.sh", "--config", "missing.yaml", stubs=stubs, cwd=workdir)
    assert "config file 'missing.yaml' not found" in stderr


# --- multi node ------------------------------------------------------------------------------------


def test_multi_node(stubs, workdir):
    line = _dry(
        "multi_node.sh",
        *CFG,
        "train.steps=3",
        stubs=stubs,
        cwd=workdir,
        **MULTI_ENV,
    )
    assert line == f"env {GPU_ENV} torchrun {RDZV} --nproc-per-node 8 {JOB} train.steps=3"


def test_multi_node_fp8_port_nproc_and_nccl_passthrough(stubs, workdir):
    line = _dry(
        "multi_node.sh",
        *CFG,
        "--fp8",
        "e4m3",
        stubs=stubs,
        cwd=workdir,
        **MULTI_ENV,
        MASTER_PORT="6000",
        NPROC="4",
        NCCL_SOCKET_IFNAME="ib0",
        NCCL_IB_HCA="mlx5_0,mlx5_1",
        TORCH_NCCL_ASYNC_ERROR_HANDLING="3",
    )
    assert line == (
        "env CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=3 "
        "TORCH_NCCL_AVOID_RECORD_STREAMS=1 NCCL_NVLS_ENABLE=0 NCCL_IB_HCA=mlx5_0\\,mlx5_1 "
        "NCCL_SOCKET_IFNAME=ib0 torchrun --nnodes 2 --node-rank 1 --rdzv-backend c10d "
        "--rdzv-endpoint node001:6000 --rdzv-id ft1 --nproc-per-node 4 "
        f"{JOB} precision.fp8=e4m3 model.spec=te"
    )
    assert shlex.split(line)[5] == "NCCL_IB_HCA=mlx5_0,mlx5_1"


def test_multi_node_rank_and_id_from_slurm(stubs, workdir):
    env = {"NNODES": "2", "MASTER_ADDR": "node001", "SLURM_PROCID": "1", "SLURM_JOB_ID": "ft1"}
    line = _dry("multi_node.sh", *CFG, stubs=stubs, cwd=workdir, **env)
    assert line == f"env {GPU_ENV} torchrun {RDZV} --nproc-per-node 8 {JOB}"


@pytest.mark.parametrize("missing", sorted(MULTI_ENV))
def test_multi_node_names_a_missing_variable(missing, stubs, workdir):
    env = {k: v for k, v in MULTI_ENV.items() if k != missing}
    stderr = _fails("multi_node.sh", "--dry-run", *CFG, stubs=stubs, cwd=workdir, **env)
    assert stderr.startswith(
        f"multi_node.sh: error: missing required environment variable {missing}:"
    )
    assert stderr.count("missing required") == 1


def test_multi_node_lists_every_missing_variable(stubs, workdir):
    stderr = _fails("multi_node.sh", "--dry-run", *CFG, stubs=stubs, cwd=workdir)
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "JOB_ID"):
        assert f"missing required environment variable {name}:" in stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NODE_RANK": "2"}, "NODE_RANK=2 is not below NNODES=2"),
        ({"NNODES": "two"}, "NNODES must be an integer >= 1, got 'two'"),
        ({"NPROC": "0"}, "NPROC must be an integer >= 1, got '0'"),
        ({"MASTER_PORT": "x"}, "MASTER_PORT must be an integer >= 1, got 'x'"),
    ],
)
def test_multi_node_rejects_bad_values(env, message, stubs, workdir):
    stderr = _fails(
        "multi_node.sh",
        "--dry-run",
        *CFG,
        stubs=stubs,
        cwd=workdir,
        **{**MULTI_ENV, **env},
    )
    assert message in stderr


# --- SLURM -----------------------------------------------------------------------------------------


def test_slurm(stubs, workdir):
    line = _dry("slurm.sbatch", *CFG, stubs=stubs, cwd=workdir, **SLURM_ENV)
    assert line == SLURM_PREFIX


def test_slurm_fp8_and_overrides(stubs, workdir):
    line = _dry(
        "slurm.sbatch",
        *CFG,
        "--fp8",
        "train.steps=3",
        stubs=stubs,
        cwd=workdir,
        **SLURM_ENV,
    )
    assert line == f"{SLURM_PREFIX} -- train.steps=3 precision.fp8=hybrid model.spec=te"


def test_slurm_container_port_nproc(stubs, workdir):
    line = _dry(
        "slurm.sbatch",
        *CFG,
        stubs=stubs,
        cwd=workdir,
        **SLURM_ENV,
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="4",
        MASTER_PORT="6000",
        CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.01-py3",
        CONTAINER_MOUNTS="/data:/data",
        SRUN_ARGS="--mpi=pmix --label",
    )
    argv = shlex.split(line)
    assert argv == [
        "env",
        "MASTER_ADDR=node001",
        "MASTER_PORT=6000",
        "NNODES=2",
        "NPROC=4",
        "JOB_ID=4242",
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--container-image=nvcr.io/nvidia/pytorch:25.01-py3",
        f"--container-mounts={REPO}:{REPO},{workdir}:{workdir},/data:/data",
        f"--container-workdir={workdir}",
        "--mpi=pmix",
        "--label",
        "bash",
        f"{LAUNCH}/multi_node.sh",
        *CFG,
    ]


def test_slurm_outside_an_allocation(stubs, workdir):
    stderr = _fails("slurm.sbatch", "--dry-run", *CFG, stubs=stubs, cwd=workdir)
    assert "not inside a SLURM allocation" in stderr
    assert "SLURM_JOB_NODELIST" in stderr


def test_slurm_spool_copy_finds_launch_via_submit_dir(stubs, workdir, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    shutil.copy(LAUNCH / "slurm.sbatch", copy)
    result = _run(
        copy,
        "--dry-run",
        *CFG,
        stubs=stubs,
        cwd=workdir,
        **SLURM_ENV,
        SLURM_SUBMIT_DIR=str(REPO),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SLURM_PREFIX
    result = _run(
        copy,
        "--dry-run",
        *CFG,
        stubs=stubs,
        cwd=workdir,
        **SLURM_ENV,
        SLURM_SUBMIT_DIR=str(workdir),
    )
    assert result.returncode != 0
    assert "TIEDLORA_LAUNCH_DIR" in result.stderr


def test_slurm_chain_runs_through_srun_and_multi_node(stubs, workdir):
    """sbatch -> srun (stub: drops its options, runs the task as SLURM_PROCID=1) ->
    multi_node.sh -> torchrun (stub: prints its env and arguments). A NODE_RANK in the submitting
    environment must not reach the tasks: each takes its own SLURM_PROCID."""
    _stub(
        stubs,
        "srun",
        'while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done\n'
        'SLURM_PROCID=1 exec "$@"\n',
    )
    torchrun = _stub(
        stubs,
        "fake-torchrun",
        'echo "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS"\n'
        'for a in "$@"; do echo "arg:$a"; done\n',
    )
    result = _run(
        "slurm.sbatch",
        *CFG,
        "--fp8",
        'run.name=it\'s "x" y',
        stubs=stubs,
        cwd=workdir,
        **SLURM_ENV,
        TORCHRUN=str(torchrun),
        NODE_RANK="5",
    )
    assert result.returncode == 0, result.stderr
    expected = [
        *RDZV.replace("ft1", "4242").split(),
        "--nproc-per-node",
        "8",
        *JOB.split(),
        'run.name=it\'s "x" y',
        "precision.fp8=hybrid",
        "model.spec=te",
    ]
    assert result.stdout.splitlines() == [
        "CUDA_DEVICE_MAX_CONNECTIONS=1",
        *(f"arg:{a}" for a in expected),
    ]
    assert "+ env MASTER_ADDR=node001" in result.stderr  # each step logs its command
    assert f"+ env {GPU_ENV} {torchrun} --nnodes 2" in result.stderr


# --- arguments, shared by every script -------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_overrides_keep_spaces_and_quotes(script, stubs, workdir):
    args = ["train.run_name=my run", 'data.prompt=it\'s "quoted"', "x=$HOME"]
    tail = ["weird arg", "--not-an-option", "a=b c"]
    line = _dry(
        script,
        *CFG,
        *args,
        "--",
        *tail,
        stubs=stubs,
        cwd=workdir,
        **_env_for(script),
    )
    quoted = (
        'train.run_name=my\\ run data.prompt=it\\\'s\\ \\"quoted\\" x=\\$HOME '
        "weird\\ arg --not-an-option a=b\\ c"
    )
    assert line.endswith(f"--config cfg.yaml {'-- ' if script == 'slurm.sbatch' else ''}{quoted}")
    assert shlex.split(line)[-len(args) - len(tail) :] == args + tail


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--config FILE is required"),
        (["--config"], "--config needs a file"),
        (["--config", "c.yaml", "--nproc", "2"], "unknown option '--nproc'"),
        (["--config", "c.yaml", "train.steps", "3"], "unexpected argument 'train.steps'"),
        (["--config", "c.yaml", "--fp8", "e5m2"], "unknown FP8 format 'e5m2'"),
        (["--config", "c.yaml", "--fp8", "model.spec=local"], "--fp8 needs the Transformer"),
        (["--config", "c.yaml", "--fp8=e4m3", "precision.fp8=hybrid"], "conflicts with"),
    ],
)
def test_argument_errors(script, args, message, stubs, workdir):
    stderr = _fails(script, "--dry-run", *args, stubs=stubs, cwd=workdir, **_env_for(script))
    assert f"{script}: error: " in stderr
    assert message in stderr


def test_config_equals_form_and_matching_fp8_overrides(stubs, workdir):
    line = _dry(
        "single_node.sh",
        "--config=cfg.yaml",
        "--fp8",
        "model.spec=te",
        stubs=stubs,
        cwd=workdir,
    )
    assert line.endswith(f"{JOB} model.spec=te precision.fp8=hybrid model.spec=te")


# --- the real job ----------------------------------------------------------------------------------


def test_single_node_runs_cpu_job(tmp_path):
    """launch/single_node.sh starts the fine-tuning job for real: 2 CPU ranks, TP=2, bf16."""
    from tests.tiny_job import make_tiny_job

    config = REPO / "examples" / "configs" / "tiny_gpt.yaml"
    tiny = [f"{k}={v}" for k, v in make_tiny_job(tmp_path / "tiny").items()]
    env = dict(os.environ)
    env.update(
        NPROC="2",
        CUDA_VISIBLE_DEVICES="",  # CPU and gloo even where GPUs are present
        TORCHRUN=f"{sys.executable} -m torch.distributed.run",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [
            BASH,
            str(LAUNCH / "single_node.sh"),
            "--config",
            str(config),
            *tiny,
            "train.steps=2",
            "parallel.tp=2",
            "precision.dtype=bf16",  # Float16Module + fp32 master weights in the optimizer
            "eval.num_examples=-1",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "step 2/2" in result.stdout, result.stdout[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "job" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert 0 < summary["final_train_loss"] < 20 and 0 < summary["tuned"]["val_loss"] < 20
