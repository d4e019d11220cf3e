"""Running the study's jobs: each a subprocess of the fine-tuning job, its output in a log beside
its results; finished jobs are skipped, so rerunning the same command resumes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO

from examples.study.plan import SUMMARY, Job, Study, StudyError


def run_job(study: Study, job: Job) -> None:
    """Run one job, its output appended to a log beside its results."""
    from tiedlora_megatron.finetune.progress import format_seconds

    if job.adapter is not None and not job.adapter.is_dir():
        raise StudyError(
            f"{job.label}: the checkpoint to score, {job.adapter}, is not here (its training run "
            "finished on another machine?); copy it here, or remove "
            f"{job.result.parent / SUMMARY} to train that run again"
        )
    argv = study.argv(job)
    launcher = (
        [sys.executable] if argv[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
    )
    log_file = job.result.parent / f"{job.command}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # One OpenMP thread per rank unless asked: ranks sharing cores otherwise stall each other.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"{job.label} ... (log: {log_file})", flush=True)
    t0 = time.perf_counter()
    with log_file.open("a") as log:
        log.write(f"+ {shlex.join(argv)}\n")
        log.flush()
        rc = run_process([*launcher, *argv[1:]], log, env)
    if rc != 0 or not job.result.is_file():
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-20:])
        why = f"exit status {rc}" if rc else f"no {job.result.name} (stopped early?)"
        raise StudyError(f"{job.label}: {why}; rerun to resume. Log {log_file}:\n{tail}")
    print(f"  done in {format_seconds(time.perf_counter() - t0)}", flush=True)


def run_process(argv: list[str], log: IO[str], env: dict[str, str]) -> int:
    """Run one job process, its output going to `log`; its exit status. (The tests replace
    this function, never the shared `subprocess` module that other code also uses.)"""
    return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def execute(study: Study, jobs: Iterator[Job], only: int | None) -> None:
    """Run every unfinished job in order, at most `only` of them."""
    ran = 0
    for job in jobs:
        if job.result.is_file():
            print(f"{job.label}: done, skipped", flush=True)
        elif not job.ready:
            print(f"{job.label}: waits for its LR sweep", flush=True)
        elif only is not None and ran >= only:
            print(f"stopping: --only {only} jobs ran", flush=True)
            break
        else:
            run_job(study, job)
            ran += 1


def print_plan(study: Study, jobs: Iterator[Job], sec_per_step: float) -> None:
    """Every command, as a shell script (finished ones commented out), and the time to go."""
    from tiedlora_megatron.finetune.progress import format_seconds

    train = evals = 0
    for job in jobs:
        line = shlex.join(study.argv(job))
        print(f"# {job.label}")
        if job.result.is_file():
            print(f"# done: {line}")
            continue
        print(line)
        train += job.command == "train"
        evals += job.command == "eval"
    estimate = format_seconds(train * study.steps * sec_per_step)
    print(
        f"# to go: {train} training runs x {study.steps} steps = {estimate} at {sec_per_step:g} "
        f"s/step, plus {evals} test evaluations and each job's start-up and validation"
    )


# ---- the report ---------------------------------------------------------------------------------
