"""One error path: every known failure of the fine-tuning job ends with one message, printed
once per job by whichever rank fails first, exit status 2 and no Python traceback (unless
TIEDLORA_DEBUG=1); the launch scripts check the whole config in one process before torchrun.

Real torchrun jobs: a config error 20 times (the race that used to lose the message) and an
output directory that is a regular file (an OSError on rank 0 while rank 1 goes on into the
model). Every other kind of failure is reported through the same `cli.report`, tested in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.finetune import cli
from tiedlora_megatron.finetune.checks import validate
from tiedlora_megatron.finetune.config import load_job_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "tiny_gpt.yaml"
LAUNCH = ROOT / "launch"
PREFIX = "tiedlora-finetune: error: "
TORCHRUN_TRACEBACK = "Traceback (most recent call last):"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from tests.tiny_job import make_tiny_job

    overrides = make_tiny_job(tmp_path_factory.mktemp("tiny"))
    return [f"{k}={v}" for k, v in overrides.items()]


@pytest.fixture
def single(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain process: no torchrun environment."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_ERROR_FILE",
                 "MASTER_ADDR", "MASTER_PORT", "TIEDLORA_DEBUG"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


# --- the report of each kind of failure ------------------------------------------------------------


def _dcp_failure() -> Exception:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        raise ValueError("unexpected end of file in __0_0.distcp\nmore detail")
    except ValueError as e:
        import traceback

        return CheckpointException("load failed", {0: (e, traceback.extract_tb(e.__traceback__))})


def _known_errors() -> list[tuple[Exception, str]]:
    import torch.distributed as dist

    from tiedlora_megatron.atomic import CollectiveError
    from tiedlora_megatron.checkpoint import CheckpointError
    from tiedlora_megatron.data import DataError
    from tiedlora_megatron.export import ExportError

    return [
        (ConfigError("optim.lr=0.0 must be > 0"), "optim.lr=0.0 must be > 0"),
        (DataError("d.jsonl:3: invalid JSON"), "d.jsonl:3: invalid JSON"),
        (CheckpointError("/c: no such checkpoint directory"), "/c: no such checkpoint directory"),
        (ExportError("/out exists"), "/out exists"),
        (OSError(30, "Read-only file system", "/ro/runs"), "/ro/runs: Read-only file system"),
        (OSError(28, "No space left on device"), "OSError: [Errno 28] No space left on device"),
        (_unicode_error(), "cannot decode text as utf-8: invalid start byte at byte 0"),
        (_dcp_failure(), "distributed checkpoint I/O failed: ValueError: unexpected end of file"),
        (CollectiveError("saving /x failed on rank 0: OSError: full"), "saving /x failed on rank"),
        (dist.DistBackendError("Connection closed by peer"), "another rank did: Connection closed"),
        (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"), "gloo"),
    ]


def _unicode_error() -> UnicodeDecodeError:
    try:
        b"\xff".decode("utf-8")
    except UnicodeDecodeError as e:
        return e
    raise AssertionError


def test_every_known_failure_is_one_line_and_status_2(single, capsys):
    for error, text in _known_errors():
        assert cli.report(error) == 2, error
        err = capsys.readouterr().err
        assert err.startswith(PREFIX) and err.count("\n") == 1, err
        assert text in err, err
        assert "Traceback" not in err


def test_unknown_failure_keeps_its_traceback(single, capsys):
    assert cli.report(ZeroDivisionError("a bug")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err or "ZeroDivisionError: a bug" in err


def test_debug_adds_the_traceback(single, capsys, monkeypatch):
    monkeypatch.setenv("TIEDLORA_DEBUG", "1")
    try:
        raise ConfigError("bad")
    except ConfigError as e:
        assert cli.report(e) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith(f"{PREFIX}bad")


def test_only_the_first_rank_reports(tmp_path, monkeypatch, capsys):
    """Ranks of one torchrun agree through a marker in the attempt's folder: the first failure
    is printed, a later one is not, and a peer's consequence error waits for it silently."""
    attempt = tmp_path / "attempt_0"
    attempt.mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("TIEDLORA_DEBUG", raising=False)
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / str(rank) / "error.json"))
        assert cli.report(ConfigError(f"mistake seen by rank {rank}")) == 2
    assert capsys.readouterr().err == f"{PREFIX}mistake seen by rank 1\n"
    assert cli.report(RuntimeError("gloo: Connection closed by peer")) == 2
    assert capsys.readouterr().err == ""


def test_ranks_on_several_nodes_agree_through_the_store(monkeypatch, capsys):
    """Across nodes the ranks claim the report in torchrun's rendezvous store."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from tiedlora_megatron.runtime import free_port

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    monkeypatch.delenv("TIEDLORA_DEBUG", raising=False)
    for rank in (3, 0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert cli.report(ConfigError(f"seen by rank {rank}")) == 2
    assert capsys.readouterr().err == f"{PREFIX}seen by rank 3\n"
    assert store.check(["tiedlora/error/job1/0"])


def test_consequence_alone_is_reported_after_waiting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "CONSEQUENCE_WAIT_S", 0.2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "1" / "error.json"))
    assert cli.report(RuntimeError("gloo: Connection closed by peer")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PREFIX}a collective failed") and err.count("\n") == 1


# --- checks at validation and before a launch ------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-0.001", "optim.lr=-0.001 must be > 0"),
        ("optim.lr=0", "optim.lr=0.0 must be > 0"),
        ("optim.min_lr=0.1", "optim.min_lr=0.1 is above optim.lr=0.01"),
        ("optim.min_lr=-1", "optim.min_lr=-1.0 must be >= 0"),
        ("optim.adam_beta2=1", "optim.adam_beta2=1.0 must be in [0, 1)"),
    ],
)
def test_optimizer_values_fail_at_validation(override, message):
    cfg = load_job_config(CONFIG, [override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        validate(cfg, 1, check_model=False)


def _check(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["show", "--check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_show_check_ok(tiny, tmp_path, single, capsys):
    args = ["--nproc", "2", "--config", str(CONFIG), *tiny, f"train.output_dir={tmp_path}/o"]
    assert _check(args, capsys) == (0, "config OK\n", "")
    assert not (tmp_path / "o").exists()  # the check creates nothing


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["parallel.tp=4"], "world size 2 is not divisible by tp x pp = 4 x 1"),
        (["optim.min_lr=1"], "optim.min_lr=1.0 is above optim.lr"),
        ("utf8", "{d}/val.jsonl:2: invalid UTF-8 (byte 0xe9 at column 15)"),
        ("roles", "{d}/val.jsonl:1: message 1 has role 'user' where 'assistant' belongs"),
        ("small", "data.validation {d}/val.jsonl has 3 examples"),
        ("file", "train.output_dir {d}/afile/run: {d}/afile is a file, not a directory"),
        ("isfile", "train.output_dir {d}/afile exists and is not a directory"),
    ],
)
def test_show_check_errors(tiny, tmp_path, single, capsys, extra, message):
    val = tmp_path / "val.jsonl"
    (tmp_path / "afile").write_text("x")
    row = {"input": "Repeat: a b\nAnswer:", "output": "a b"}
    kinds = {
        "utf8": lambda: val.write_bytes(
            (json.dumps(row) + "\n").encode() + b'{"input": "caf\xe9", "output": "x"}\n'
        ),
        "roles": lambda: _jsonl(
            val,
            [
                {
                    "messages": [{"role": "user", "content": "a"}] * 2
                    + [{"role": "assistant", "content": "b"}]
                }
            ],  # fmt: skip
        ),
        "small": lambda: _jsonl(val, [row] * 3),
    }
    if isinstance(extra, str):
        if extra in kinds:
            kinds[extra]()
            extra = [f"data.validation={val}", "data.template=chat" if extra == "roles" else ""]
        else:
            out = tmp_path / "afile" / ("run" if extra == "file" else "")
            extra = [f"train.output_dir={str(out).rstrip('/')}"]
    extra = [e for e in extra if e]
    args = ["--nproc", "2", "--config", str(CONFIG), *tiny, f"train.output_dir={tmp_path}/o"]
    code, out, err = _check([*args, *extra], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(PREFIX + message.format(d=tmp_path)), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_show_check_read_only_output_dir(tiny, tmp_path, single, capsys):
    """Root ignores file modes, so "unwritable" is a read-only tmpfs."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(ro)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        args = ["--nproc", "2", "--config", str(CONFIG), *tiny, f"train.output_dir={ro}/run"]
        code, _, err = _check(args, capsys)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert code == 2
    assert (
        err == f"{PREFIX}train.output_dir {ro}/run is not writable ({ro}: Read-only file system)\n"
    )


# --- under a real torchrun -------------------------------------------------------------------------


def _torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "tiedlora_megatron.finetune", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    env.pop("TIEDLORA_DEBUG", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _workers_said(proc: subprocess.CompletedProcess) -> str:
    """The workers' stderr: everything before torchrun's own traceback (the launcher's
    ChildFailedError, which torchrun prints whenever a worker exits non-zero)."""
    err = proc.stderr
    cut = err.find(TORCHRUN_TRACEBACK)
    if cut >= 0:
        assert "distributed/run.py" in err[cut:] and "ChildFailedError" in err[cut:], err
        assert TORCHRUN_TRACEBACK not in err[cut + 1 :], err  # only the launcher's
        err = err[:cut]
    return err


def _assert_one_report(proc: subprocess.CompletedProcess, message: str) -> None:
    said = _workers_said(proc)
    assert proc.returncode != 0
    assert said.count(PREFIX) == 1, said
    assert message in said, said
    assert "Traceback" not in said, said
    codes = {line.split(":")[1].split()[0] for line in proc.stderr.splitlines()
             if line.strip().startswith("exitcode")}  # fmt: skip
    assert codes <= {"2", "-15"}, proc.stderr  # 2, or killed by torchrun after a peer's 2


RACE_RUNS = 8


def test_config_error_under_torchrun_reported_once_in_every_run():
    """Both ranks find the same mistake at once; whichever exits first, exactly one prints it
    (RACE_RUNS launches, 4 at a time, so that the ranks' order varies)."""
    message = "optim.lr=0.0 must be > 0"
    args = ["train", "--config", str(CONFIG), "optim.lr=0", "train.global_batch=4"]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: _torchrun(args, timeout=300), range(RACE_RUNS)))
    for i, proc in enumerate(runs):
        try:
            _assert_one_report(proc, message)
        except AssertionError as e:
            raise AssertionError(
                f"run {i + 1} of {RACE_RUNS}: {e}\n--- stderr ---\n{proc.stderr}"
            ) from None


def test_output_dir_that_is_a_file_under_torchrun(tiny, tmp_path):
    """Rank 0's mkdir fails (an OSError) while rank 1 goes on into the model: one message."""
    target = tmp_path / "afile"
    target.write_text("not a directory")
    proc = _torchrun(["train", "--config", str(CONFIG), *tiny, f"train.output_dir={target}",
                      "train.steps=2", "eval.num_examples=-1"])  # fmt: skip
    _assert_one_report(proc, f"{target}: File exists")


# --- the launch scripts check before torchrun ------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts need bash")
@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_launch_scripts_stop_a_bad_config_before_torchrun(script, tiny, tmp_path):
    started = tmp_path / "torchrun_started"
    fake = tmp_path / "torchrun"
    fake.write_text(f"#!/bin/sh\ntouch {started}\n")
    fake.chmod(0o755)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TORCHRUN": str(fake),
        "TIEDLORA_PYTHON": sys.executable,
        "NPROC": "2",
        "CUDA_VISIBLE_DEVICES": "",
    }
    if script == "multi_node.sh":  # node 1 of 2: 4 ranks in all
        env.update(NNODES="2", NODE_RANK="1", MASTER_ADDR="localhost", JOB_ID="x",
                   TIEDLORA_CHECK_GRACE="0")  # fmt: skip
    small = tmp_path / "val.jsonl"
    _jsonl(small, [{"input": "Repeat: a\nAnswer:", "output": "a"}] * 3)
    dp = 4 if script == "multi_node.sh" else 2
    # One check per script (each costs a Python start-up): the optimizer on one node, the
    # validation split against all 2 x 2 ranks on the other.
    for override, message in [
        ("optim.min_lr=1", "optim.min_lr=1.0 is above optim.lr=0.01")
        if script == "single_node.sh"
        else (f"data.validation={small}", f"data.validation {small} has 3 examples"),
    ]:
        proc = subprocess.run(
            ["bash", str(LAUNCH / script), "--config", str(CONFIG), *tiny, "train.global_batch=8",
             f"train.output_dir={tmp_path}/run", "train.micro_batch=2", override],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        assert proc.stderr.startswith(PREFIX + message) and proc.stderr.count("\n") == 1, (
            proc.stderr
        )
        assert "data.validation" not in message or f"2 x {dp} = {2 * dp}" in proc.stderr
        assert not started.exists()
