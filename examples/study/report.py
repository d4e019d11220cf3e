"""The study's report, rebuilt from whatever results exist: results.csv (one row per run and per
base model), results.md (those rows, every LR sweep, and each tied method against LoRA with
95 % intervals), a trade-off plot per task and commands.sh (the command behind every point).

A comparison pairs the two methods' test scorings seed by seed on the same questions: the
per-question scores come from the predictions each scoring wrote, kept compactly beside its
result (`*_question_scores.json`), so a committed study needs no predictions file to report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.study.plan import (
    BASE_RESULT,
    SUMMARY,
    Setting,
    Study,
    StudyError,
    lr_text,
    primary_metric,
    read_json,
    targets_name,
)
from examples.study.plot import plot_tradeoff
from examples.study.stats import mean_interval, seed_and_question_bootstrap
from tiedlora_megatron.finetune.config import JobConfig

QUESTION_SCORES = "question_scores.json"
LORA = "lora"


# ---- what each run scored -----------------------------------------------------------------------


def question_scores(result_path: Path, metrics: Sequence[str]) -> dict[str, list[float]] | None:
    """Per-question test scores (percent) of one scoring (`eval_*.json`), None if it has not
    run or kept no predictions. Read from `<stem>_question_scores.json`, else computed once from
    the predictions file the scoring wrote and saved there; checked against the scoring's own
    means."""
    from tiedlora_megatron.atomic import write_json_atomic
    from tiedlora_megatron.data.metrics import example_scores

    cache = result_path.with_name(f"{result_path.stem}_{QUESTION_SCORES}")
    result = read_json(result_path)
    if result is None:
        return None
    if cache.is_file():
        scores = json.loads(cache.read_text())["scores"]
    else:
        predictions = result_path.parent / str(result.get("predictions", ""))
        if "predictions" not in result or not predictions.is_file():
            return None
        rows = [json.loads(line) for line in predictions.read_text().splitlines() if line]
        scores = {
            m: [100.0 * example_scores([m], r["prediction"], r["references"])[m] for r in rows]
            for m in metrics
        }
        write_json_atomic(cache, {"predictions": predictions.name, "scores": scores})
    for m in metrics:
        mean = sum(scores[m]) / len(scores[m])
        if not math.isclose(mean, result[m], abs_tol=1e-6):
            raise StudyError(f"{cache}: {m} averages {mean}, but {result_path} says {result[m]}")
    return scores


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


# ---- methods over their seeds, and against LoRA --------------------------------------------------


def _scored_seeds(study: Study, s: Setting, metrics: Sequence[str]) -> dict[int, dict]:
    """seed -> per-question test scores of the method's runs at its chosen LR that have them."""
    lr = study.chosen_lr(s)
    if lr is None:
        return {}
    out = {}
    for seed in s.seeds:
        scores = question_scores(study.test_result(study.run_dir(s, seed, lr)), metrics)
        if scores is not None:
            out[seed] = scores
    return out


def _val_losses(study: Study, s: Setting) -> list[float]:
    lr = study.chosen_lr(s)
    summaries = (
        [] if lr is None else [read_json(study.run_dir(s, x, lr) / SUMMARY) for x in s.seeds]
    )
    return [float(x["tuned"]["val_loss"]) for x in summaries if x and "val_loss" in x["tuned"]]


def _spread(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def method_points(study: Study, task: str, settings: list[Setting]) -> list[dict[str, Any]]:
    """One point per method for the plot: parameters, and per metric (mean, low, high) over its
    scored seeds and the questions (val_loss: mean ± the seeds' standard deviation)."""
    from tiedlora_megatron.data import get_task

    metrics = get_task(task).metrics
    points = []
    for s in (s for s in settings if s.task == task):
        lr = study.chosen_lr(s)
        summary = None if lr is None else read_json(study.run_dir(s, s.seeds[0], lr) / SUMMARY)
        if summary is None:
            continue
        point: dict[str, Any] = {
            "preset": s.preset, "rank": s.rank, "targets": targets_name(s.targets),
            "trainable_parameters": summary["trainable_parameters"],
        }  # fmt: skip
        scored = list(_scored_seeds(study, s, metrics).values())
        tests = [read_json(study.test_result(study.run_dir(s, x, lr))) for x in s.seeds]
        tests = [t for t in tests if t is not None]
        for m in metrics:
            if scored:
                point[m] = mean_interval([x[m] for x in scored])
            elif tests:  # scored before per-question scores were kept: the mean, no interval
                mean = statistics.mean(t[m] for t in tests)
                point[m] = (mean, mean, mean)
            else:
                point[m] = None
        losses = _val_losses(study, s)
        if losses:
            mean = statistics.mean(losses)
            sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
            point["val_loss"] = (mean, mean - sd, mean + sd)
        points.append(point)
    return points


def comparisons(study: Study, task: str, settings: list[Setting]) -> list[list[str]]:
    """Rows of the comparison table: each method against LoRA at the same rank and targets, over
    the seeds both have scored on test (paired by seed), 95 % intervals."""
    from tiedlora_megatron.data import get_task

    metrics = get_task(task).metrics
    ours = [s for s in settings if s.task == task]
    lora = {(s.rank, s.targets): s for s in ours if s.preset.lower() == LORA}
    rows = []
    for s in ours:
        ref = lora.get((s.rank, s.targets))
        if s.preset.lower() == LORA or ref is None:
            continue
        mine, theirs = _scored_seeds(study, s, metrics), _scored_seeds(study, ref, metrics)
        seeds = [x for x in mine if x in theirs]
        if not seeds:
            continue
        row = [str(s.rank), targets_name(s.targets), s.preset, str(len(seeds))]
        row += [_spread(_val_losses(study, s)), _spread(_val_losses(study, ref))]
        for m in metrics:
            c = seed_and_question_bootstrap(
                [mine[x][m] for x in seeds], [theirs[x][m] for x in seeds], names=(s.preset, "LoRA")
            )
            means = [statistics.mean(v for x in seeds for v in d[x][m]) for d in (mine, theirs)]
            row += [
                f"{means[0]:.1f} / {means[1]:.1f}",
                f"{c.mean:+.1f} [{c.low:+.1f}, {c.high:+.1f}]",
                f"**{c.verdict}**",
            ]
        rows.append(row)
    return rows


# ---- results.md -----------------------------------------------------------------------------------


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
    widen = (
        f", widened past an edge choice at the grid's spacing (at most {study.max_widenings} "
        f"rate{'s' if study.max_widenings > 1 else ''} per side)"
        if study.max_widenings and len(study.lrs) > 1
        else ""
    )
    questions = study.test_examples if study.test_examples is not None else cfg.eval.num_examples
    return (
        f"Model: {cfg.model.source}{':' + cfg.model.path if cfg.model.path else ''} "
        f"({cfg.precision.dtype}, {study.nproc} rank{'s' if study.nproc > 1 else ''}). "
        f"Budget for every method: {study.steps} "
        f"steps x {t.global_batch} examples (micro-batch {t.micro_batch}), {o.warmup_steps} "
        f"warm-up steps then {o.decay} decay, max length {d.max_length}; adapter alpha = rank. "
        f"LR per method from {{{', '.join(map(lr_text, study.lrs))}}}{widen} by {by} on "
        f"{cfg.eval.val_examples or 'all'} validation examples (first seed); test metrics (%) "
        f"from each seed's final checkpoint on the same {questions or 'all'} test questions. "
        f"Config {study.config} {' '.join(study.overrides)}".rstrip()
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


def _sweep_table(study: Study, task: str, settings: list[Setting]) -> list[str]:
    """The LR sweeps of the task's methods: every rate any of them ran, the choice in bold."""
    ours = [s for s in settings if s.task == task and len(study.lrs) > 1]
    sweeps = [(s, study.sweep(s)) for s in ours]
    if not ours:
        return []
    rates = sorted({lr for _, sw in sweeps for lr in sw.scores} | set(study.lrs))
    rows = []
    for s, sw in sweeps:
        chosen = None if sw.step is None else sw.step.chosen
        cells = [
            "" if lr not in sw.scores
            else f"**{sw.scores[lr]:.4g}**" if lr == chosen else f"{sw.scores[lr]:.4g}"
            for lr in rates
        ]  # fmt: skip
        note = "on the edge at the widening limit" if sw.at_limit else ""
        rows.append([s.preset, str(s.rank), targets_name(s.targets), *cells, note])
    what = "val loss" if study.select == "val_loss" else f"validation {primary_metric(task)}"
    header = ["preset", "rank", "targets", *(f"lr {lr_text(lr)}" for lr in rates), "note"]
    seed = ours[0].seeds[0]
    return [
        "",
        f"LR sweep ({what}, seed {seed}; chosen in bold):",
        "",
        markdown_table(header, rows),
    ]


def _comparison_table(study: Study, task: str, settings: list[Setting]) -> list[str]:
    from tiedlora_megatron.data import get_task

    rows = comparisons(study, task, settings)
    if not rows:
        return []
    header = ["rank", "targets", "method", "seeds", "val loss (mean ± sd)", "LoRA val loss"]
    for m in get_task(task).metrics:
        header += [f"{m}: method / LoRA", "difference [95 % CI]", "at 95 %"]
    return [
        "",
        "Against LoRA (same rank and targets), paired by seed on the same test questions: the "
        "difference of the means (method - LoRA) with a 95 % bootstrap interval that resamples "
        'the seeds and the questions; "match" when it contains 0.',
        "",
        markdown_table(header, rows),
    ]


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
        parts += _comparison_table(study, task, settings)
        parts += _sweep_table(study, task, settings)
        if any(r.get(m) is not None for r in task_rows for m in get_task(task).metrics):
            base = next((r for r in task_rows if r["preset"] == "base"), None)
            panels = [*get_task(task).metrics, "val_loss"]
            points = method_points(study, task, settings)
            plot_tradeoff(points, base, task, panels, study.out / f"tradeoff_{task}.png")
    (study.out / "results.md").write_text("\n".join(parts) + "\n")
    return rows


# ---- commands.sh ----------------------------------------------------------------------------------


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
            sweep = study.sweep(s)
            lr = study.chosen_lr(s)
            for seed in s.seeds:
                if lr is None:
                    lines.append(f"# {task}/{s.name} seed {seed}: its LR sweep has not finished")
                    continue
                rates = " ".join(map(lr_text, sorted(sweep.scores)))
                how = f"chosen from {rates} by {study.select}"
                lines += [
                    f"# {task}/{s.name} seed {seed}: lr {lr_text(lr)} ({how})",
                    shlex.join(study.argv(study.train_job(s, seed, lr))),
                    shlex.join(study.argv(study.test_job(s, seed, lr))),
                ]
    path = study.out / "commands.sh"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
