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

The parts: plan.py (the grid, the jobs, the LR sweep and its widening), runner.py (the job
processes), report.py and plot.py (the outputs), stats.py (the sweep rule and the intervals).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root holds `examples`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.study.plan import (  # noqa: E402
    DEFAULT_CONFIG,
    DEFAULT_PRESETS,
    STUDY_KEYS,
    Study,
    StudyError,
    build_grid,
)
from examples.study.report import write_commands, write_report  # noqa: E402
from examples.study.runner import execute, print_plan  # noqa: E402
from tiedlora_megatron.config import PRESETS, ConfigError  # noqa: E402
from tiedlora_megatron.finetune.checks import validate  # noqa: E402
from tiedlora_megatron.finetune.config import load_job_config  # noqa: E402


def _list(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x]


def _seed_caps(text: str) -> dict[int, int]:
    """'32=2,64=1' -> {32: 2, 64: 1}."""
    caps = {}
    for item in filter(None, text.split(",")):
        rank, sep, n = item.partition("=")
        if not sep or not rank.strip().isdigit() or not n.strip().isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"expected RANK=N with N >= 1, got {item!r}")
        caps[int(rank)] = int(n)
    return caps


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
    p.add_argument(
        "--seeds-at",
        type=_seed_caps,
        default={},
        metavar="RANK=N,...",
        help="run only the first N of --seeds at these ranks (a budget cut), e.g. 32=2",
    )
    p.add_argument(
        "--lrs", type=_list(float), default=[1e-3, 3e-3, 1e-2], help="the LR sweep's base grid"
    )
    p.add_argument(
        "--max-widenings",
        type=int,
        default=2,
        help="rates added past an edge of the sweep while its best rate is on that edge, at the "
        "grid's own spacing, at most this many per side (0: the grid only; default %(default)s)",
    )
    p.add_argument(
        "--test-examples",
        type=int,
        help="test questions each chosen run and the base model are scored on, the same "
        "(first N of the test split) for every run (default: the config's eval.num_examples)",
    )
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
    if args.max_widenings < 0:
        p.error(f"--max-widenings must be >= 0, got {args.max_widenings}")
    if args.test_examples is not None and args.test_examples < 1:
        p.error(f"--test-examples must be >= 1, got {args.test_examples}")
    for item in args.overrides:
        key = item.split("=", 1)[0]
        if key in STUDY_KEYS:
            p.error(f"{key} is set by the study for each job; use {STUDY_KEYS[key]}")
    return args


def main(argv: list[str] | None = None) -> int:
    from tiedlora_megatron.runtime.cpu import quiet_megatron

    args = parse_args(argv)
    quiet_megatron()  # megatron's CPU-host notices at import (the jobs hide theirs likewise)
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
            max_widenings=args.max_widenings,
            test_examples=args.test_examples,
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
