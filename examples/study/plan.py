"""The study's plan: the grid of methods, the jobs each needs, and the learning-rate sweep.

A method (`Setting`: a preset at a rank on a set of target layers, on one task) is trained with
its first seed at every rate of the base sweep (`--lrs`), ranked on the validation split. While
the best rate lies on the sweep's edge, one more rate past that edge is run (`stats.sweep_step`,
at the grid's own spacing, at most `--max-widenings` per side; a choice still on the edge is
flagged). The chosen run's final checkpoint is scored on the test split, and every other seed
trains at the chosen rate and is scored likewise. Each job's directory is
`<out>/<task>/<preset>_r<rank>_<targets>_s<seed>_lr<lr>/`; a job whose result file exists is done.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examples.study.stats import SweepStep, sweep_step
from tiedlora_megatron.config import DENSE_TARGETS, ConfigError

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
    "eval.num_examples": "--test-examples (training runs generate nothing when ranking by loss)",
    "train.steps": "--steps",
    "data.task": "--tasks",
    "train.output_dir": "--out",
    "eval.split": "--select (training runs score validation, evaluations test)",
    "eval.before": "nothing: the base model has its own eval job",
}
# A task's needs beyond the base config: the SQuAD config's 24-token answers would cut every worked
# math solution short, so GSM generates up to its task's own budget.
TASK_OVERRIDES = {"gsm": ("eval.max_new_tokens=null",)}


class StudyError(RuntimeError):
    """A job failed or stopped early; the study stops (rerun to resume)."""


# ---- the grid -----------------------------------------------------------------------------------


# ---- the grid ---------------------------------------------------------------------------------


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
    with every seed, or the first N at a rank `--seeds-at` caps."""
    target_sets = [parse_targets(t) for t in args.targets]
    seeds: dict[tuple[str, int, tuple[str, ...]], tuple[int, ...]] = {}
    for preset in args.presets:
        for rank in args.ranks:
            seeds[preset, rank, target_sets[0]] = tuple(args.seeds[:1])
    for targets in target_sets[1:]:
        for preset in args.wide_presets:
            for rank in args.ranks:
                seeds[preset, rank, targets] = tuple(args.seeds[:1])
    for preset in args.seed_presets:
        for rank in args.seed_ranks:
            if (preset, rank, target_sets[0]) in seeds:
                seeds[preset, rank, target_sets[0]] = tuple(args.seeds[: args.seeds_at.get(rank)])
    return [
        Setting(task, preset, rank, targets, s)
        for task in args.tasks
        for (preset, rank, targets), s in seeds.items()
    ]


# ---- jobs -------------------------------------------------------------------------------------


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
    max_widenings: int = 2  # rates added past each edge of the sweep, at most
    test_examples: int | None = None  # eval.num_examples of the test scorings (None: config's)

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
        overrides = (
            f"data.task={s.task}",
            "eval.split=test",
            *self._test_size(),
            f"train.output_dir={d}",
        )
        label = f"{s.task}/{d.name} test"
        return Job(label, s.task, "eval", overrides, self.checkpoint(d), self.test_result(d))

    def base_job(self, task: str) -> Job:
        d = self.base_dir(task)
        overrides = (
            f"data.task={task}",
            "eval.split=test",
            *self._test_size(),
            f"train.output_dir={d}",
        )
        return Job(f"{task}/base test", task, "eval", overrides, None, d / BASE_RESULT)

    def _test_size(self) -> tuple[str, ...]:
        return () if self.test_examples is None else (f"eval.num_examples={self.test_examples}",)

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

    def sweep(self, s: Setting) -> Sweep:
        """The method's sweep so far: the base rates' scores, then each rate that widening
        asked for and that has run; `step` None until every base rate has run."""
        scores: dict[float, float] = {}
        for lr in self.lrs:
            value = self.score(s, lr)
            if value is None:
                return Sweep(scores, None)
            scores[lr] = value
        if len(self.lrs) == 1:
            return Sweep(scores, SweepStep(chosen=self.lrs[0]))
        lower_is_better = self.select == "val_loss"
        while True:
            step = sweep_step(scores, lower_is_better, self.lrs, self.max_widenings)
            value = None if step.widen_to is None else self.score(s, step.widen_to)
            if value is None:
                return Sweep(scores, step)
            scores[step.widen_to] = value

    def chosen_lr(self, s: Setting) -> float | None:
        """The sweep's choice on validation (a diverged run ranks last); None until made."""
        step = self.sweep(s).step
        return None if step is None else step.chosen

    def jobs(self, tasks: list[str], settings: list[Setting], match: list[str]) -> Iterator[Job]:
        """Per task: the base model, then per method its LR sweep (widened while its best rate is
        on an edge), the chosen run's test score, and the other seeds at the chosen LR; only
        what `match` selects. Lazy: each next job is decided once the previous ones have run
        (a dry run, which runs nothing, shows the rest with a placeholder LR)."""
        for task in tasks:
            if matches(f"{task}/base", match):
                yield self.base_job(task)
            for s in settings:
                if s.task != task or not matches(f"{task}/{s.name}", match):
                    continue
                for lr in self.lrs:
                    yield self.train_job(s, s.seeds[0], lr)
                asked = None
                while (step := self.sweep(s).step) is not None and step.widen_to is not None:
                    if step.widen_to == asked:  # not run (a dry run): the rest waits for it
                        break
                    asked = step.widen_to
                    yield self.train_job(s, s.seeds[0], asked)
                lr = self.chosen_lr(s)
                for seed in s.seeds:
                    if seed != s.seeds[0]:
                        yield self.train_job(s, seed, lr)
                    yield self.test_job(s, seed, lr)


@dataclass(frozen=True)
class Sweep:
    """A method's LR sweep: every rate run so far and its validation score, and what
    `stats.sweep_step` says next (None while a base rate has not run)."""

    scores: dict[float, float]
    step: SweepStep | None

    @property
    def at_limit(self) -> bool:
        """The choice is still on an edge: the widening limit stopped the sweep."""
        return self.step is not None and self.step.at_limit


def matches(key: str, patterns: list[str]) -> bool:
    """`--match`: no patterns select everything."""
    return not patterns or any(fnmatch.fnmatch(key, p) for p in patterns)
