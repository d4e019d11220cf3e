"""The fine-tuning job under the faults operators meet: a second job in the same output directory,
a rerun with other settings, SIGTERM mid-run (SLURM's preemption and time-limit warning), a
corrupt newest checkpoint, an interrupted prune, foreign names among the checkpoints, duplicate
metrics rows after a resume, a validation split too small to use.

The end-to-end tests run the tiny job (tests/tiny_job.py) under torchrun on 2 CPU ranks with
real signals: one reference run (while it holds the lock, a second job in its directory must be
refused), one run stopped by SIGTERM at a random step and rerun to the end (bitwise equal to the
reference), and one rerun that extends `train.steps`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.tiny_job import make_tiny_job

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "tiny_gpt.yaml"
STEPS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


# ---- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def common(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tiny = make_tiny_job(tmp_path_factory.mktemp("tiny"))
    return [
        *(f"{k}={v}" for k, v in tiny.items()),
        f"train.steps={STEPS}",
        "train.save_interval=2",
        "train.keep_checkpoints=2",
        "eval.num_examples=-1",
        "eval.val_examples=8",
    ]


def _command(overrides: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "tiedlora_megatron.finetune", "train",
        "--config", str(CONFIG), *overrides,
    ]  # fmt: skip


def _start(overrides: list[str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        _command(overrides), stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, text=True
    )


def _run(overrides: list[str], ok: bool = True) -> str:
    proc = subprocess.run(
        _command(overrides), capture_output=True, text=True, env=ENV, timeout=400, cwd=ROOT
    )
    output = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"rc {proc.returncode}\n{output[-6000:]}"
    return output


def _metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            rows.append(json.loads(line))
    return rows


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _metrics(output_dir) if "loss" in r]


def _wait_for_step(proc: subprocess.Popen, output_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not any(s >= step for s, _ in _losses(output_dir)):
        assert proc.poll() is None, f"job ended early (rc {proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, "the job did not reach step {step}"
        time.sleep(0.01)


def _workers(proc: subprocess.Popen) -> list[int]:
    """The torchrun job's worker PIDs, rank 0 first (each leads its own process group)."""
    import psutil

    children = psutil.Process(proc.pid).children()
    ranked = sorted((int(c.environ().get("RANK", "0")), c.pid) for c in children)
    assert len(ranked) == 2, ranked
    return [pid for _, pid in ranked]


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = checkpoint.parent.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(flat))
    state = torch.load(flat, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# ---- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(common: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run. While it holds its output directory (its workers paused with
    SIGSTOP after step 1), a second job there is started and must fail; then it goes on."""
    root = tmp_path_factory.mktemp("reference")
    out, log = root / "run", root / "run.log"
    proc = _start([*common, f"train.output_dir={out}"], log)
    try:
        _wait_for_step(proc, out, 1, log)
        workers = _workers(proc)
        holder = json.loads((out / ".lock").read_text())
        for pid in workers:
            os.killpg(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            second = _run([*common, f"train.output_dir={out}"], ok=False)
            second_seconds = time.monotonic() - started
        finally:
            for pid in workers:
                os.killpg(pid, signal.SIGCONT)
        assert proc.wait(timeout=300) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    return {
        "dir": out,
        "log": log.read_text(),
        "holder": holder,
        "rank0": workers[0],
        "second": second,
        "second_seconds": second_seconds,
    }


def test_second_job_in_a_locked_output_dir_is_refused(reference: dict) -> None:
    holder, second = reference["holder"], reference["second"]
    assert holder["pid"] == reference["rank0"] and holder["host"] == socket.gethostname()
    assert "is in use by another job" in second, second[-4000:]
    assert f"host {holder['host']}, PID {holder['pid']}, since {holder['since']}" in second
    assert "choose another train.output_dir" in second
    # The first job finished normally, and released the lock (an empty lock file).
    assert json.loads((reference["dir"] / "summary.json").read_text())["steps"] == STEPS
    assert (reference["dir"] / ".lock").read_text() == ""
    assert [s for s, _ in _losses(reference["dir"])] == list(range(1, STEPS + 1))


def test_sigterm_saves_and_the_rerun_is_bitwise_the_uninterrupted_run(
    common: list[str], reference: dict, tmp_path: Path
) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    # A stale lock of a dead job, and names in checkpoints/ that are no checkpoints.
    (out / "checkpoints" / "step_0000003.bak").mkdir(parents=True)
    (out / "checkpoints" / "step_0000003.bak" / "tiedlora.json").write_text("{}")
    (out / "checkpoints" / "step_x").mkdir()
    (out / "checkpoints" / "step_0000099").write_text("a file")
    dead = {"host": socket.gethostname(), "pid": 2**22 + 17, "since": "2026-01-01T00:00:00Z"}
    (out / ".lock").write_text(json.dumps(dead))

    at = random.randint(3, 5)
    proc = _start([*common, f"train.output_dir={out}"], log)
    try:
        _wait_for_step(proc, out, at, log)
        rank0, rank1 = _workers(proc)
        os.killpg(rank1, signal.SIGTERM)  # as SLURM does: each worker's whole process group,
        time.sleep(random.uniform(0, 0.1))  # and not at the same moment
        os.killpg(rank0, signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0, text[-6000:]
    assert "taking over a stale lock (host" in text and f"PID {dead['pid']}" in text
    stops = [line for line in text.splitlines() if "SIGTERM received; saved" in line]
    assert len(stops) == 1, text[-4000:]
    stopped = int(stops[0].split(":")[0].split()[1])
    assert at <= stopped < STEPS, (at, stopped)
    assert not (out / "summary.json").exists()
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_???????") if p.is_dir())
    assert saved[-1] == f"step_{stopped:07d}" and len(saved) == 2, saved

    # The newest checkpoint gets corrupted: the rerun must skip it, say why, and resume from
    # the one before (the metrics of the steps after it are logged again, not twice).
    newest = out / "checkpoints" / saved[-1]
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    previous = int(saved[0].split("_")[1])
    rerun = _run([*common, f"train.output_dir={out}"])
    assert f"skipping checkpoint {newest}" in rerun, rerun[-4000:]
    assert f"resumed from {out / 'checkpoints' / saved[0]} at step {previous}" in rerun

    assert _losses(out) == _losses(reference["dir"])  # every step once, bitwise the same
    final = f"checkpoints/step_{STEPS:07d}"
    a, b = _tensors(reference["dir"] / final), _tensors(out / final)
    assert sorted(a) == sorted(b) and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_rerun_with_other_settings_is_refused_or_continued(
    common: list[str], reference: dict, tmp_path: Path
) -> None:
    from tiedlora_megatron.config import ConfigError
    from tiedlora_megatron.finetune.checkpoints import choose_resume
    from tiedlora_megatron.finetune.config import load_job_config

    out = tmp_path / "run"
    shutil.copytree(reference["dir"], out)
    train_file = next(a for a in common if a.startswith("data.train=")).split("=", 1)[1]
    other = tmp_path / "other_train.jsonl"
    shutil.copy(train_file, other)
    here = [*common, f"train.output_dir={out}"]

    changed = [*here, "train.steps=16", "optim.lr=5e-2", f"data.train={other}"]
    with pytest.raises(ConfigError) as refused:
        choose_resume(load_job_config(CONFIG, changed), out)
    message = str(refused.value)
    assert f"step_{STEPS:07d} (step {STEPS}) was trained with another configuration" in message
    assert f"train.steps: {STEPS} -> 16" in message
    assert "optim.lr: 0.01 -> 0.05" in message
    assert f'data.train: "{train_file}" -> "{other}"' in message
    assert "another train.output_dir" in message and "train.on_config_change=continue" in message
    # Keys that cannot change the result pass without a word.
    neutral = [*here, "train.log_interval=3", "eval.val_examples=4", "train.keep_checkpoints=5"]
    point = choose_resume(load_job_config(CONFIG, neutral), out)
    assert point.step == STEPS and not point.changes

    # Rerun as it was, it resumes at its last step and trains nothing: its summary carries the
    # training time and loss its checkpoint recorded (not "0m00s" and nan) and says 0 this run.
    same = _run(here)
    summary = json.loads((out / "summary.json").read_text())
    first = json.loads((reference["dir"] / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"]) == (STEPS, 0)
    assert summary["final_train_loss"] == first["final_train_loss"]
    assert summary["train_seconds"] == first["train_seconds"] > 0
    assert "train" not in summary["seconds"] and summary["seconds"]["final_eval"] > 0
    assert f"({STEPS} steps, {first['train_seconds'] / STEPS:.2f} s/step, 0 this run)" in same

    # Opted in, the extended run trains steps 13-16 with lr > 0 on the rebuilt schedule.
    _run([*here, "train.steps=16", "train.on_config_change=continue"])
    rows = {r["step"]: r for r in _metrics(out) if "loss" in r}
    assert sorted(rows) == list(range(1, 17))
    assert all(rows[s]["lr"] > 0 for s in range(13, 17)), rows
    before, after = (
        _tensors(out / f"checkpoints/step_{STEPS:07d}"),
        _tensors(out / "checkpoints/step_0000016"),
    )
    adapter = [k for k in before if "adapter" in k and "optimizer" not in k]
    assert adapter and any(not torch.equal(before[k], after[k]) for k in adapter)
    meta = json.loads((out / "checkpoints/step_0000016/tiedlora.json").read_text())
    assert meta["extra"]["job"]["train"]["steps"] == 16
    assert meta["scheduler"]["lr_decay_steps"] == 16


def test_the_summary_times_each_phase_apart(reference: dict) -> None:
    from tiedlora_megatron.finetune.progress import timing_text

    summary = json.loads((reference["dir"] / "summary.json").read_text())
    seconds = summary["seconds"]
    assert {"load", "train", "save", "final_eval"} <= set(seconds), seconds
    assert all(v > 0 for v in seconds.values()), seconds
    assert sum(seconds.values()) <= summary["job_seconds"]
    assert summary["train_seconds"] == seconds["train"]
    assert summary["steps_this_run"] == summary["steps"] == STEPS
    assert timing_text(summary) in reference["log"]


# ---- pieces, without process groups -------------------------------------------------------------


def test_timing_text_keeps_training_apart_from_loading_and_evaluation() -> None:
    from tiedlora_megatron.finetune.progress import timing_text

    summary = {
        "steps": 30,
        "steps_this_run": 30,
        "train_seconds": 291.0,
        "job_seconds": 797.0,
        "seconds": {"load": 21.0, "base_eval": 240.0, "train": 291.0, "final_eval": 236.0},
    }
    assert timing_text(summary) == (
        "time: load 0m21s | base eval 4m00s | train 4m51s (30 steps, 9.70 s/step) | "
        "tuned eval 3m56s | this run 13m17s"
    )
    resumed = {**summary, "steps_this_run": 0, "job_seconds": 250.0}
    resumed["seconds"] = {"load": 14.0, "final_eval": 236.0}
    assert timing_text(resumed) == (
        "time: load 0m14s | train 4m51s (30 steps, 9.70 s/step, 0 this run) | "
        "tuned eval 3m56s | this run 4m10s"
    )


def test_a_resumed_run_purges_later_tensorboard_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorBoard gets purge_step = the first step this run logs, so an earlier run's events
    from there on are hidden rather than plotted twice (tensorboard itself is optional)."""
    import types

    from tiedlora_megatron.finetune.progress import Scalars

    made: list[dict] = []

    class Writer:
        def __init__(self, logdir: str, purge_step: int | None = None) -> None:
            made.append({"logdir": logdir, "purge_step": purge_step})

        def add_scalar(self, *args: object) -> None:
            pass

        def close(self) -> None:
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    Scalars(tmp_path, first_step=0).close()
    Scalars(tmp_path, first_step=6).close()
    assert [m["purge_step"] for m in made] == [None, 7]
    assert made[0]["logdir"] == str(tmp_path / "tensorboard")


def _fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "tiedlora.json").write_text("{}")
    return path


def test_scan_ignores_foreign_names(tmp_path: Path) -> None:
    from tiedlora_megatron.finetune.job import checkpoint_dirs

    root = tmp_path / "checkpoints"
    good = [_fake_checkpoint(root / f"step_{n:07d}") for n in (2, 10)]
    for name in ("step_0000003.bak", "step_x", ".step_0000004.deleting", ".step_0000005.partial"):
        _fake_checkpoint(root / name)
    (root / "step_0000011").write_text("a file, not a checkpoint")
    (root / "step_0000012").mkdir()  # incomplete: no metadata
    assert checkpoint_dirs(tmp_path) == good


def test_interrupted_prune_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiedlora_megatron.finetune import checkpoints

    root = tmp_path / "checkpoints"
    for n in (2, 4, 6):
        _fake_checkpoint(root / f"step_{n:07d}")
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        (path / "tiedlora.json").unlink()  # the metadata went first, then the prune died
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.prune(tmp_path, keep=1, final_step=100)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == [
        "step_0000004",
        "step_0000006",
    ]
    assert not (root / "step_0000002").exists() and (root / ".step_0000002.deleting").is_dir()

    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    checkpoints.prune(tmp_path, keep=1, final_step=100)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000006"]


def test_lock_names_its_holder_and_takes_over_a_stale_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tiedlora_megatron.config import ConfigError
    from tiedlora_megatron.finetune.outdir import OutputDirLock

    first = OutputDirLock(tmp_path / "run")
    first.acquire()
    holder = json.loads((tmp_path / "run" / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match="is in use by another job") as refused:
        OutputDirLock(tmp_path / "run").acquire()
    assert f"PID {os.getpid()}, since {holder['since']}" in str(refused.value)
    with pytest.raises(ConfigError, match="is in use by another job") as probed:
        OutputDirLock(tmp_path / "run").check_free()  # the pre-launch check
    assert str(probed.value) == str(refused.value)
    first.release()
    OutputDirLock(tmp_path / "run").check_free()
    OutputDirLock(tmp_path / "never-made").check_free()
    assert not (tmp_path / "never-made").exists()
    capsys.readouterr()

    stale = {"host": "gone-node", "pid": 4242, "since": "2026-01-01T00:00:00Z"}
    (tmp_path / "run" / ".lock").write_text(json.dumps(stale))
    again = OutputDirLock(tmp_path / "run")
    again.acquire()
    assert "taking over a stale lock (host gone-node, PID 4242" in capsys.readouterr().out
    again.release()


def test_config_changes_and_their_defaults() -> None:
    from tiedlora_megatron.finetune.checkpoints import config_changes
    from tiedlora_megatron.finetune.config import JobConfig

    old = JobConfig().to_dict()
    del old["train"]["on_config_change"]  # saved before the key existed: counts at its default
    new = JobConfig()
    new.train.log_interval, new.parallel.tp, new.eval.num_examples = 1, 2, 5
    assert config_changes(old, new.to_dict()) == []
    new.adapter.rank, new.data.seed = 16, 3
    assert config_changes(old, new.to_dict()) == [("adapter.rank", 8, 16), ("data.seed", 0, 3)]


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path: Path) -> None:
    from tiedlora_megatron.finetune.checkpoints import trim_metrics

    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)] + [{"step": 2, "val_loss": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo'  # torn last line
    (tmp_path / "metrics.jsonl").write_text(text)
    trim_metrics(tmp_path, 2)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [rows[0], rows[1], rows[4]]


def test_too_small_validation_split_fails_before_training(tmp_path: Path) -> None:
    from tiedlora_megatron.config import ConfigError
    from tiedlora_megatron.finetune.batches import Split, validation_count
    from tiedlora_megatron.finetune.config import load_job_config

    cfg = load_job_config(CONFIG, ["data.validation=/data/val.jsonl", "eval.val_examples=0"])
    split = Split(examples=[None] * 5, samples=[None] * 3, dropped=2)
    with pytest.raises(ConfigError) as small:
        validation_count(cfg, split, dp_size=2)
    assert "data.validation=/data/val.jsonl has 3 usable examples (2 over" in str(small.value)
    assert "needs at least train.micro_batch x data-parallel size = 4" in str(small.value)
    assert validation_count(cfg, split, dp_size=1) == 2


def test_stop_signals_are_noted_and_deferred_in_children() -> None:
    from tiedlora_megatron.finetune.preemption import StopRequest

    with StopRequest(torch.device("cpu")) as stop:
        assert stop.agreed() is None
        with stop.deferred():
            # A process started here (fork + exec) inherits the block: a signal to the whole
            # process group mid-save does not kill such a helper of the checkpoint writer.
            probe = "import signal; print(signal.SIGTERM in signal.pthread_sigmask(0, []))"
            child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
            assert child.stdout.strip() == "True"
            os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.agreed() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_slurm_asks_for_the_signal_ahead_of_the_time_limit() -> None:
    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=TERM@" in text
