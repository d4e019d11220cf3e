"""The Tied-LoRA paper's trade-off study: task quality against trainable parameters (issue #9).

Every method (an adapter preset at a rank on a set of target layers) gets the same budget: the
base config's steps, batch, schedule and data. Only the learning rate is the method's own, chosen
from a small sweep on the *validation* split (lowest validation loss, or the best task metric with
`--select metric`); the chosen run's final checkpoint is then scored once on the *test* split, so
the test split never picks anything. Extra seeds (adapter init, dropout and data order) reuse the
LR their method's first seed chose. The base model is scored once per task.

Each job is a subprocess, `torchrun ... -m tiedlora_megatron.finetune train|eval`, writing to its
own directory `<out>/<task>/<preset>_r<rank>_<targets>_s<seed>_lr<lr>/`:

    train  summary.json (validation score, parameter counts, timing) and checkpoints/
    eval   eval_step_<steps>.json: the test score of the final checkpoint (chosen LR only)

A job whose result file exists is skipped, so rerunning the same command resumes the study (an
interrupted training run resumes from its newest checkpoint: the job does that). In `--out`:
results.csv, results.md, tradeoff_<task>.png and commands.sh, rebuilt from whatever results exist
(`--report-only` rebuilds them without running anything). The JSON files alone are the study's
state: a copy of `--out` without checkpoints and logs (examples/study/results is one) resumes on
another machine, as long as no finished training run still waits for its test score.

    python examples/study/run_study.py --out runs/study --dry-run        # the plan and its cost
    python examples/study/run_study.py --out runs/study                  # the whole default grid
    python examples/study/run_study.py --out runs/study --match 'squad/*_r8_qkv'
    python examples/study/run_study.py --out runs/study --report-only
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tiedlora_megatron.config import DENSE_TARGETS, PRESETS, ConfigError
from tiedlora_megatron.finetune.checks import validate
from tiedlora_megatron.finetune.config import JobConfig, load_job_config

DEFAULT_CONFIG = "examples/configs/smollm2_squad.yaml"
# LoRA, VeRA, and the paper's tied variants: vBuA and three others.
DEFAULT_PRESETS = ("lora", "vera", "vBuA", "vBA", "BuA", "vB~uA")
MODULE = "tiedlora_megatron.finetune"
SUMMARY = "summary.json"
BASE_RESULT = "eval_base.json"  # what `eval` without --adapter writes
LR_PLACEHOLDER = "<LR>"  # in the plan, for runs whose LR sweep has not finished
# Keys every job gets from the study; the option named sets them.
STUDY_KEYS = {
    "adapter.preset": "--presets",
    "adapter.rank": "--ranks",
    "adapter.target_modules": "--targets",
    "adapter.seed": "--seeds",
    "train.seed": "--seeds",
    "data.seed": "--seeds",
    "optim.lr": "--lrs",
    "train.steps": "--steps",
    "data.task": "--tasks",
    "train.output_dir": "--out",
    "eval.split": "--select (training runs score validation, evaluations test)",
    "eval.before": "nothing: the base model has its own eval job",
}
# A task's needs beyond the base config: the SQuAD config's 24-token answers would cut every worked
# math solution short, so GSM generates up to its task's own budget.
TASK_OVERRIDES = {"gsm": ("eval.max_new_tokens=null",)}
# How the plot tells the families apart: (family, marker, colour); every other preset is tied,
# each tied preset in a colour of its own.
FAMILIES = {"lora": ("LoRA", "s", "tab:red"), "vera": ("VeRA", "^", "tab:green")}
TIED_FAMILY = ("Tied-LoRA", "o", None)
TIED_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:cyan", "tab:olive")


class StudyError(RuntimeError):
    """A job failed or stopped early; the study stops (rerun to resume)."""


# ---- the grid -----------------------------------------------------------------------------------


def parse_targets(spec: str) -> tuple[str, ...]:
    """'qkv', 'qkv+fc1', 'linear_proj' or 'all' as megatron layer names, in canonical order."""
    if spec == "all":
        return DENSE_TARGETS
    names = {item if item.startswith("linear_") else f"linear_{item}" for item in spec.split("+")}
    if not names <= set(DENSE_TARGETS):
        raise ConfigError(f"unknown target in {spec!r}; use qkv, proj, fc1, fc2 joined by '+'")
    return tuple(t for t in DENSE_TARGETS if t in names)


def targets_name(targets: tuple[str, ...]) -> str:
    """The short name of a target set in run directories: 'all' or e.g. 'qkv+fc1'."""
    if targets == DENSE_TARGETS:
        return "all"
    return "+".join(t.removeprefix("linear_") for t in targets)


def primary_metric(task: str) -> str:
    """The task metric `--select metric` ranks by: its last (F1 for SQuAD, accuracy for GSM)."""
    from tiedlora_megatron.data import get_task

    return get_task(task).metrics[-1]


@dataclass(frozen=True)
class Setting:
    """One method on one task; its LR sweep runs with the first of its seeds."""

    task: str
    preset: str
    rank: int
    targets: tuple[str, ...]
    seeds: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.preset}_r{self.rank}_{targets_name(self.targets)}"


def build_grid(args: argparse.Namespace) -> list[Setting]:
    """Every preset at every rank on the first target set, `--wide-presets` also on the other
    sets, all with the first seed; those of `--seed-presets` at `--seed-ranks` on the first set
    with every seed."""
    target_sets = [parse_targets(t) for t in args.targets]
    seeds: dict[tuple[str, int, tuple[str, ...]], tuple[int, ...]] = {}
    for preset in args.presets:
        for rank in args.ranks:
            seeds[preset, rank, target_sets[0]] = args.seeds[:1]
    for targets in target_sets[1:]:
        for preset in args.wide_presets:
            for rank in args.ranks:
                seeds[preset, rank, targets] = args.seeds[:1]
    for preset in args.seed_presets:
        for rank in args.seed_ranks:
            if (preset, rank, target_sets[0]) in seeds:
                seeds[preset, rank, target_sets[0]] = args.seeds
    return [
        Setting(task, preset, rank, targets, s)
        for task in args.tasks
        for (preset, rank, targets), s in seeds.items()
    ]


# ---- jobs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One subprocess of the fine-tuning job, done once `result` exists."""

    label: str
    task: str
    command: str  # 'train' or 'eval'
    overrides: tuple[str, ...]
    adapter: Path | None
    result: Path

    @property
    def ready(self) -> bool:
        """False while it waits for its LR sweep (the plan shows it with a placeholder)."""
        return LR_PLACEHOLDER not in str(self.result)


def lr_text(lr: float | None) -> str:
    return LR_PLACEHOLDER if lr is None else f"{lr:g}"


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class Study:
    """Where the study writes, what every job shares, and how the LR is chosen."""

    out: Path
    config: str
    nproc: int
    steps: int
    lrs: tuple[float, ...]
    select: str  # 'val_loss' or 'metric'
    overrides: tuple[str, ...]  # the caller's key=value, applied last

    def run_dir(self, s: Setting, seed: int, lr: float | None) -> Path:
        return self.out / s.task / f"{s.name}_s{seed}_lr{lr_text(lr)}"

    def base_dir(self, task: str) -> Path:
        return self.out / task / "base"

    def checkpoint(self, run_dir: Path) -> Path:
        """The final checkpoint of a training run (the job keeps it whatever keep_checkpoints)."""
        from tiedlora_megatron.finetune.job import CHECKPOINTS, STEP_PREFIX

        return run_dir / CHECKPOINTS / f"{STEP_PREFIX}{self.steps:07d}"

    def test_result(self, run_dir: Path) -> Path:
        return run_dir / f"eval_{self.checkpoint(run_dir).name}.json"

    def train_job(self, s: Setting, seed: int, lr: float | None) -> Job:
        """Train with `lr`, scored on validation only (no generation when ranking by loss)."""
        d = self.run_dir(s, seed, lr)
        overrides = (
            f"data.task={s.task}",
            f"adapter.preset={s.preset}",
            f"adapter.rank={s.rank}",
            f"adapter.alpha={s.rank}",  # scale 1 at every rank: rank does not move the LR
            f"adapter.target_modules=[{','.join(s.targets)}]",
            f"adapter.seed={seed}",
            f"train.seed={seed}",
            f"data.seed={seed}",
            f"optim.lr={lr_text(lr)}",
            f"train.steps={self.steps}",
            "eval.before=false",
            "eval.split=validation",
            *(("eval.num_examples=-1",) if self.select == "val_loss" else ()),
            f"train.output_dir={d}",
        )
        return Job(f"{s.task}/{d.name} train", s.task, "train", overrides, None, d / SUMMARY)

    def test_job(self, s: Setting, seed: int, lr: float | None) -> Job:
        """Score the chosen run's final checkpoint on the test split."""
        d = self.run_dir(s, seed, lr)
        overrides = (f"data.task={s.task}", "eval.split=test", f"train.output_dir={d}")
        label = f"{s.task}/{d.name} test"
        return Job(label, s.task, "eval", overrides, self.checkpoint(d), self.test_result(d))

    def base_job(self, task: str) -> Job:
        d = self.base_dir(task)
        overrides = (f"data.task={task}", "eval.split=test", f"train.output_dir={d}")
        return Job(f"{task}/base test", task, "eval", overrides, None, d / BASE_RESULT)

    def job_overrides(self, job: Job) -> list[str]:
        """The job's overrides, then its task's, then the caller's (which win)."""
        return [*job.overrides, *TASK_OVERRIDES.get(job.task, ()), *self.overrides]

    def argv(self, job: Job) -> list[str]:
        """The command as printed (`torchrun`, or `python` for one rank)."""
        launcher = (
            ["python", "-m"]
            if self.nproc == 1
            else ["torchrun", "--standalone", f"--nproc-per-node={self.nproc}", "-m"]
        )
        adapter = ["--adapter", str(job.adapter)] if job.adapter else []
        return [
            *launcher,
            MODULE,
            job.command,
            "--config",
            self.config,
            *adapter,
            *self.job_overrides(job),
        ]

    def score(self, s: Setting, lr: float) -> float | None:
        """A sweep run's validation score (None until it has finished)."""
        path = self.run_dir(s, s.seeds[0], lr) / SUMMARY
        summary = read_json(path)
        if summary is None:
            return None
        key = "val_loss" if self.select == "val_loss" else primary_metric(s.task)
        if key not in summary["tuned"]:  # a sweep run for --select val_loss generates nothing
            raise StudyError(f"{path} has no validation {key}; use --select val_loss")
        return float(summary["tuned"][key])

    def chosen_lr(self, s: Setting) -> float | None:
        """The sweep's best LR on validation (a diverged run ranks last); None until every sweep
        run has finished."""
        if len(self.lrs) == 1:
            return self.lrs[0]
        scores = {lr: self.score(s, lr) for lr in self.lrs}
        if any(v is None for v in scores.values()):
            return None
        sign = 1.0 if self.select == "val_loss" else -1.0

        def badness(lr: float) -> float:
            value = sign * scores[lr]
            return value if math.isfinite(value) else math.inf

        return min(self.lrs, key=badness)

    def jobs(self, tasks: list[str], settings: list[Setting], match: list[str]) -> Iterator[Job]:
        """Per task: the base model, then per method its LR sweep, the chosen run's test score,
        and the other seeds at the chosen LR; only what `match` selects. Lazy: a method's LR is
        chosen once the jobs of its sweep have run."""
        for task in tasks:
            if matches(f"{task}/base", match):
                yield self.base_job(task)
            for s in settings:
                if s.task != task or not matches(f"{task}/{s.name}", match):
                    continue
                for lr in self.lrs:
                    yield self.train_job(s, s.seeds[0], lr)
                lr = self.chosen_lr(s)
                for seed in s.seeds:
                    if seed != s.seeds[0]:
                        yield self.train_job(s, seed, lr)
                    yield self.test_job(s, seed, lr)


def matches(key: str, patterns: list[str]) -> bool:
    """`--match`: no patterns select everything."""
    return not patterns or any(fnmatch.fnmatch(key, p) for p in patterns)


# ---- running ------------------------------------------------------------------------------------


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


def collect_rows(study: Study, tasks: list[str], settings: list[Setting]) -> list[dict[str, Any]]:
    """One row per finished point (the chosen LR of a method and seed) and per scored base model."""
    from tiedlora_megatron.data import get_task

    rows = []
    for task in tasks:
        metrics = get_task(task).metrics
        base = read_json(study.base_dir(task) / BASE_RESULT)
        if base is not None:
            rows.append({
                "task": task, "preset": "base", "trainable_parameters": 0,
                "val_loss": base.get("val_loss"), **{m: base.get(m) for m in metrics},
                "test_examples": base.get("eval_examples"), "run": f"{task}/base",
            })  # fmt: skip
        for s in settings:
            lr = study.chosen_lr(s) if s.task == task else None
            if lr is None:  # another task's, or its sweep has not finished
                continue
            for seed in s.seeds:
                d = study.run_dir(s, seed, lr)
                summary = read_json(d / SUMMARY)
                if summary is None:
                    continue
                test = read_json(study.test_result(d)) or {}
                rows.append({
                    "task": task, "preset": s.preset, "rank": s.rank,
                    "targets": targets_name(s.targets), "seed": seed,
                    "trainable_parameters": summary["trainable_parameters"],
                    "ratio_to_lora": summary["ratio_to_lora"], "lr": lr,
                    "val_loss": summary["tuned"].get("val_loss"),
                    **{m: test.get(m) for m in metrics}, "test_examples": test.get("eval_examples"),
                    "train_seconds": summary["train_seconds"], "run": f"{task}/{d.name}",
                })  # fmt: skip
    return rows


def _cell(key: str, value: Any) -> str:
    from tiedlora_megatron.finetune.progress import format_seconds

    if value is None:
        return ""
    if key == "trainable_parameters":
        return f"{value:,}"
    if key == "ratio_to_lora":
        return f"{100 * value:.2f} %"
    if key == "lr":
        return f"{value:g}"
    if key == "val_loss":
        return f"{value:.4f}"
    if key == "train_seconds":
        return format_seconds(value)
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def machine() -> str:
    """The hardware and software the study ran on, for the report's header."""
    import platform

    import megatron.core
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    else:
        cpu = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                     if ln.startswith("model name")]  # fmt: skip
            cpu = names[0] if names else cpu
        device = f"CPU {cpu}, {os.cpu_count()} cores"
    return (
        f"Machine: {device}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"megatron-core {megatron.core.__version__}."
    )


def describe(study: Study, cfg: JobConfig) -> str:
    """The budget every method shares, for the report's header."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    by = "lowest validation loss" if study.select == "val_loss" else "best validation metric"
    return (
        f"Model: {cfg.model.source}{':' + cfg.model.path if cfg.model.path else ''} "
        f"({cfg.precision.dtype}, {study.nproc} rank{'s' if study.nproc > 1 else ''}). "
        f"Budget for every method: {study.steps} "
        f"steps x {t.global_batch} examples (micro-batch {t.micro_batch}), {o.warmup_steps} "
        f"warm-up steps then {o.decay} decay, max length {d.max_length}; adapter alpha = rank. "
        f"LR per method from {{{', '.join(map(lr_text, study.lrs))}}} by {by}; test metrics "
        f"(%) from the chosen run's final checkpoint. Config {study.config} "
        f"{' '.join(study.overrides)}".rstrip()
    )


COLUMNS = [
    "preset",
    "rank",
    "targets",
    "seed",
    "trainable_parameters",
    "ratio_to_lora",
    "lr",
    "val_loss",
]
TITLES = {
    "trainable_parameters": "trainable",
    "ratio_to_lora": "vs LoRA",
    "val_loss": "val loss",
    "test_examples": "test n",
    "train_seconds": "train time",
}


def write_report(
    study: Study, tasks: list[str], settings: list[Setting], cfg: JobConfig
) -> list[dict[str, Any]]:
    """results.csv, results.md and one trade-off plot per task, from the results that exist."""
    from tiedlora_megatron.data import get_task

    rows = collect_rows(study, tasks, settings)
    metrics = list(dict.fromkeys(m for t in tasks for m in get_task(t).metrics))
    fields = ["task", *COLUMNS, *metrics, "test_examples", "train_seconds", "run"]
    study.out.mkdir(parents=True, exist_ok=True)
    with (study.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    parts = ["# Tied-LoRA trade-off study", "", describe(study, cfg), "", machine()]
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        keys = [*COLUMNS, *get_task(task).metrics, "test_examples", "train_seconds"]
        table = [[_cell(k, r.get(k)) for k in keys] for r in task_rows]
        parts += [
            "",
            f"## {task} (test split)",
            "",
            markdown_table([TITLES.get(k, k) for k in keys], table),
        ]
        sweeps = []
        for s in (s for s in settings if s.task == task and len(study.lrs) > 1):
            chosen = study.chosen_lr(s)
            scores = [study.score(s, lr) for lr in study.lrs]
            cells = [
                "" if v is None else f"**{v:.4g}**" if lr == chosen else f"{v:.4g}"
                for lr, v in zip(study.lrs, scores, strict=True)
            ]
            sweeps.append([s.preset, str(s.rank), targets_name(s.targets), *cells])
        if sweeps:
            what = (
                "val loss" if study.select == "val_loss" else f"validation {primary_metric(task)}"
            )
            header = ["preset", "rank", "targets", *(f"lr {lr_text(lr)}" for lr in study.lrs)]
            parts += [
                "",
                f"LR sweep ({what}, seed {settings[0].seeds[0]}; chosen in bold):",
                "",
                markdown_table(header, sweeps),
            ]
        if any(r.get(m) is not None for r in task_rows for m in get_task(task).metrics):
            panels = [*get_task(task).metrics, "val_loss"]
            plot_tradeoff(task_rows, task, panels, study.out / f"tradeoff_{task}.png")
    (study.out / "results.md").write_text("\n".join(parts) + "\n")
    return rows


def plot_tradeoff(rows: list[dict[str, Any]], task: str, metrics: list[str], path: Path) -> None:
    """Test quality against trainable parameters (log x), one point per run, the base model as a
    line: the paper's trade-off figure, one panel per metric (`val_loss`: the validation loss,
    which still separates methods where a test metric sits at its floor). A point's shape is its
    family, its colour its preset, its size its rank; the first target set (the paper's QKV in
    the default grid) is filled, the others hollow. One legend says all of that, so no text
    crowds the points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FormatStrFormatter, NullFormatter
    except ImportError:
        print(
            f"no {path.name}: matplotlib is missing (pip install matplotlib, or the `bench` extra)"
        )
        return
    runs = [r for r in rows if r["preset"] != "base"]
    presets = list(dict.fromkeys(r["preset"] for r in runs))
    target_sets = list(dict.fromkeys(r["targets"] for r in runs))
    ranks = sorted({r["rank"] for r in runs})
    tied_colours = itertools.cycle(TIED_COLOURS)
    style = {}  # preset -> (legend text, marker, colour)
    for preset in presets:
        family, marker, colour = FAMILIES.get(preset.lower(), TIED_FAMILY)
        if colour is None:
            colour = next(tied_colours)
        text = family if preset.lower() in FAMILIES else f"{preset} ({family})"
        style[preset] = (text, marker, colour)

    def size(rank: int) -> float:  # area grows with rank, the smallest rank at 30
        return 30.0 * math.sqrt(rank / ranks[0])

    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for r in (r for r in runs if r.get(metric) is not None):
            _, marker, colour = style[r["preset"]]
            face = colour if r["targets"] == target_sets[0] else "none"
            ax.scatter(r["trainable_parameters"], r[metric], marker=marker, s=size(r["rank"]),
                       facecolors=face, edgecolors=colour, linewidths=1.2, alpha=0.9)  # fmt: skip
        base = next((r for r in rows if r["preset"] == "base" and r.get(metric) is not None), None)
        if base is not None:
            ax.axhline(base[metric], color="gray", linestyle="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.08)
        ax.set_xlabel("trainable parameters")
        if metric == "val_loss":  # log: an untrained method's loss would flatten the rest
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        else:  # a percentage, from 0: a metric at its floor should look like one
            ax.set_ylim(bottom=0)
        ax.set_ylabel("validation loss" if metric == "val_loss" else f"{metric} on test (%)")
        ax.grid(alpha=0.3)

    def key(label: str, marker: str = "o", colour: str = "gray", face: str | None = None,
            ms: float = 6.0, line: str = "none") -> Line2D:  # fmt: skip
        return Line2D([], [], marker=marker, color=colour, markerfacecolor=face or colour,
                      markersize=ms, linestyle=line, label=label)  # fmt: skip

    handles = [key(text, marker, colour) for text, marker, colour in style.values()]
    handles += [key(f"rank {k}", ms=math.sqrt(size(k))) for k in ranks]
    handles += [
        key(f"on {t}", face="gray" if i == 0 else "none") for i, t in enumerate(target_sets)
    ]
    handles.append(key("base model", marker="", line="--"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{task}: quality vs trainable parameters")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cd_line() -> str:
    """Where commands.sh must run: the repository it lies in when the study ran from a
    repository's root (so a committed copy works in any clone), else the study's directory."""
    cwd = Path.cwd()
    if (cwd / ".git").exists():
        return 'cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"'
    return f"cd {shlex.quote(str(cwd))}"


def write_commands(study: Study, tasks: list[str], settings: list[Setting]) -> None:
    """commands.sh: the exact commands behind each point (its training run at the chosen LR and
    its test score), and the base models'."""
    lines = [
        "#!/usr/bin/env bash",
        "# Every point of this study, reproduced (written by examples/study/run_study.py).",
        "set -euo pipefail",
        _cd_line(),
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
    ]
    for task in tasks:
        lines += ["", f"# {task}: the base model", shlex.join(study.argv(study.base_job(task)))]
        for s in (s for s in settings if s.task == task):
            lr = study.chosen_lr(s)
            for seed in s.seeds:
                if lr is None:
                    lines.append(f"# {task}/{s.name} seed {seed}: its LR sweep has not finished")
                    continue
                how = f"chosen from {' '.join(map(lr_text, study.lrs))} by {study.select}"
                lines += [
                    f"# {task}/{s.name} seed {seed}: lr {lr_text(lr)} ({how})",
                    shlex.join(study.argv(study.train_job(s, seed, lr))),
                    shlex.join(study.argv(study.test_job(s, seed, lr))),
                ]
    path = study.out / "commands.sh"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


# ---- command line -------------------------------------------------------------------------------


def _list(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Lists are comma-separated. Anything of the form key=value is passed to every job "
        "(e.g. model.source=hf model.path=... precision.dtype=bf16).",
    )
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="study directory")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="base job YAML (default: %(default)s)")
    p.add_argument("--tasks", type=_list(str), default=["squad", "gsm"])
    p.add_argument(
        "--presets",
        type=_list(str),
        default=list(DEFAULT_PRESETS),
        help=f"presets or factor notations (presets: {', '.join(PRESETS)})",
    )
    p.add_argument("--ranks", type=_list(int), default=[8, 32])
    p.add_argument(
        "--targets",
        type=_list(str),
        default=["qkv", "all"],
        help="target sets, e.g. qkv,all,qkv+fc1: every preset runs on the first, "
        "--wide-presets on the others",
    )
    p.add_argument("--wide-presets", type=_list(str), default=["lora", "vBuA"])
    p.add_argument(
        "--seeds",
        type=_list(int),
        default=[0, 1],
        help="adapter, train and data seeds: the first for every run (and the LR "
        "sweep), all of them for --seed-presets at --seed-ranks",
    )
    p.add_argument("--seed-presets", type=_list(str), default=["lora", "vBuA"])
    p.add_argument("--seed-ranks", type=_list(int), default=[8])
    p.add_argument("--lrs", type=_list(float), default=[1e-3, 3e-3, 1e-2], help="the LR sweep")
    p.add_argument(
        "--select",
        choices=["val_loss", "metric"],
        default="val_loss",
        help="rank the sweep by validation loss, or by the task metric on validation "
        "(generates answers in every sweep run)",
    )
    p.add_argument("--steps", type=int, help="training steps (default: the config's)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per job (1: no torchrun)")
    p.add_argument(
        "--match",
        action="append",
        metavar="GLOB",
        help="run only methods whose '<task>/<preset>_r<rank>_<targets>' (or "
        "'<task>/base') matches; repeatable; the report still covers the whole grid",
    )
    p.add_argument("--only", type=int, metavar="N", help="run at most N jobs, then stop")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the outputs, run nothing")
    p.add_argument("--sec-per-step", type=float, default=10.0, help="for the --dry-run estimate")
    p.add_argument("overrides", nargs="*", help="key=value for every job")
    args = p.parse_intermixed_args(argv)
    for item in args.overrides:
        key = item.split("=", 1)[0]
        if key in STUDY_KEYS:
            p.error(f"{key} is set by the study for each job; use {STUDY_KEYS[key]}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_job_config(args.config, args.overrides)
        study = Study(
            out=args.out,
            config=args.config,
            nproc=args.nproc,
            steps=args.steps or cfg.train.steps,
            lrs=tuple(args.lrs),
            select=args.select,
            overrides=tuple(args.overrides),
        )
        settings = build_grid(args)
        if not args.report_only:  # every method's job config, checked before hours of running
            firsts = [study.base_job(t) for t in args.tasks]
            firsts += [study.train_job(s, s.seeds[0], study.lrs[0]) for s in settings]
            for job in firsts:
                validate(load_job_config(args.config, study.job_overrides(job)), args.nproc, False)
    except ConfigError as e:
        print(f"run_study: error: {e}", file=sys.stderr)
        return 2

    jobs = study.jobs(args.tasks, settings, args.match or [])
    status = 0
    try:
        if args.dry_run:
            print_plan(study, jobs, args.sec_per_step)
            return 0
        if not args.report_only:
            execute(study, jobs, args.only)
    except StudyError as e:
        print(f"run_study: {e}", file=sys.stderr)
        status = 1
    try:  # also after a failure: the report shows how far the study got
        rows = write_report(study, args.tasks, settings, cfg)
        write_commands(study, args.tasks, settings)
    except StudyError as e:
        print(f"run_study: {e}", file=sys.stderr)
        return 1
    print(f"{len(rows)} results in {study.out / 'results.md'} (and results.csv, commands.sh)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
