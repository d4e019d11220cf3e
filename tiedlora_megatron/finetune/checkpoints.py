"""A job's step checkpoints: the scan, pruning, the choice of the one to resume from, and the
resume contract.

`checkpoints/step_NNNNNNN` directories hold the adapters, optimizer and scheduler state and, in
their metadata, the job configuration that produced them. Only names of exactly that form count;
anything else there (`step_5.bak`, `step_x`, files, the hidden `.step_N.partial` of a save in
progress or the `.step_N.deleting` of a prune) is ignored.

The resume contract: a rerun continues a checkpoint only under the configuration that produced
it. A rerun whose configuration differs in a key that can change the trained adapter is refused,
with the changed keys and the two ways forward: a new `train.output_dir`, or
`train.on_config_change=continue`, which continues the checkpoint's adapters and optimizer state
under the new configuration with the learning-rate schedule rebuilt from it (so extending
`train.steps` really trains the extra steps). `RESULT_NEUTRAL_KEYS` lists the keys that may
change freely.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.finetune.config import JobConfig
from tiedlora_megatron.finetune.progress import is_rank0, log

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
_STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d+)")
_DELETING = ".deleting"

#: Config keys that cannot change the trained adapter, so a rerun may change them without a
#: word: logging, evaluation, checkpointing and output knobs, resume itself, and the parallel
#: layout and micro-batch split (checkpoints reshard; results agree up to float rounding).
#: Every other key is part of the resume contract.
RESULT_NEUTRAL_KEYS = frozenset(
    {
        "train.log_interval",
        "train.eval_interval",
        "train.save_interval",
        "train.keep_checkpoints",
        "train.exit_interval",
        "train.output_dir",
        "train.resume",
        "train.on_config_change",
        "train.micro_batch",
        "eval.val_examples",
        "eval.num_examples",
        "eval.split",
        "eval.batch_size",
        "eval.max_new_tokens",
        "eval.before",
        "data.validation",
        "data.test",
        "parallel.tp",
        "parallel.pp",
        "parallel.vpp",
        "parallel.sp",
        "parallel.overlap_grad_reduce",
        "model.recompute",
    }
)


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (a save is complete once it has its metadata);
    names other than `step_<digits>` are ignored."""
    from tiedlora_megatron.checkpoint import METADATA_FILE

    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        match = _STEP_NAME.fullmatch(p.name)
        if match and p.is_dir() and (p / METADATA_FILE).is_file():
            found.append((int(match.group(1)), p))
    return [p for _, p in sorted(found)]


def _remove(path: Path) -> None:
    """Delete checkpoint `path` so that no interruption leaves it looking complete: rename it to
    a hidden `.<name>.deleting` (atomic), then remove that."""
    doomed = path.parent / f".{path.name}{_DELETING}"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def prune(output_dir: Path, keep: int, final_step: int) -> None:
    """Keep the newest `keep` step checkpoints (and the final step's); rank 0 only. Leftovers of
    an interrupted prune are removed too."""
    if not is_rank0():
        return
    root = Path(output_dir) / CHECKPOINTS
    for leftover in root.glob(f".{STEP_PREFIX}*{_DELETING}"):
        shutil.rmtree(leftover, ignore_errors=True)
    old = [p for p in checkpoint_dirs(output_dir) if p.name != checkpoint_name(final_step)]
    for p in old[: max(len(old) - keep, 0)]:
        _remove(p)


# ---- the resume contract ------------------------------------------------------------------------


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every contract key that differs. Keys the saved config
    does not record (added to the job since) count at their defaults."""
    before = {**_flatten(JobConfig().to_dict()), **_flatten(saved)}
    return [
        (key, before.get(key), value)
        for key, value in _flatten(new).items()
        if key not in RESULT_NEUTRAL_KEYS and before.get(key) != value
    ]


def _changes_text(changes: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {json.dumps(old)} -> {json.dumps(new)}" for k, old, new in changes)


@dataclass
class ResumePoint:
    """Where a job starts: a checkpoint and its step (None, 0: from scratch), the accepted
    config changes (`train.on_config_change=continue`; the LR schedule is then rebuilt), and
    the progress the checkpoint recorded (training seconds so far, last train loss)."""

    path: Path | None = None
    step: int = 0
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    progress: dict[str, float] = field(default_factory=dict)

    @property
    def rebuild_schedule(self) -> bool:
        return bool(self.changes)


def _verify(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata once its files verify; CheckpointError naming what is wrong."""
    from tiedlora_megatron.checkpoint import verify_adapter_checkpoint

    return verify_adapter_checkpoint(path)


def choose_resume(cfg: JobConfig, output_dir: Path) -> ResumePoint:
    """The checkpoint a job continues from (run on rank 0): the newest one in `output_dir` that
    verifies (newer ones that do not are skipped, saying why), or `train.resume`'s path; then
    the resume contract. ConfigError / CheckpointError with the fix otherwise."""
    from tiedlora_megatron.checkpoint import CheckpointError

    existing = checkpoint_dirs(output_dir)
    mode = cfg.train.resume
    if mode == "never":
        if existing:
            raise ConfigError(
                f"{output_dir} already has checkpoints ({existing[-1].name}); set "
                "train.resume=auto to continue that run, or choose another train.output_dir"
            )
        return ResumePoint()
    if mode == "auto":
        if not existing:
            return ResumePoint()
        problems = []
        for path in reversed(existing):
            try:
                meta = _verify(path)
                break
            except CheckpointError as e:
                problems.append(f"{path.name}: {e}")
                log(f"skipping checkpoint {path}: it does not verify ({e})")
        else:
            raise CheckpointError(
                f"no checkpoint in {output_dir / CHECKPOINTS} verifies:\n  "
                + "\n  ".join(problems)
                + "\nmove them away to start over there, or choose another train.output_dir"
            )
    else:
        path = Path(mode)
        meta = _verify(path)

    step = int(meta["step"])
    extra = meta.get("extra") or {}
    progress = extra.get("progress") or {}
    saved = extra.get("job")
    if saved is None:
        log(f"{path} records no job configuration; resuming without checking it")
        return ResumePoint(path, step, progress=progress)
    changes = config_changes(saved, cfg.to_dict())
    if not changes:
        return ResumePoint(path, step, progress=progress)
    if cfg.train.on_config_change != "continue":
        raise ConfigError(
            f"{path} (step {step}) was trained with another configuration; resuming it would "
            f"mix the two silently. Changed:\n{_changes_text(changes)}\n"
            "Either start a new run in another train.output_dir, or continue this checkpoint "
            "under the new configuration with "
            "train.on_config_change=continue (adapters and optimizer state carry on, the "
            f"learning-rate schedule is rebuilt from the new configuration at step {step})"
        )
    log(
        f"continuing {path} (step {step}) under a changed configuration "
        f"(train.on_config_change=continue; LR schedule rebuilt):\n{_changes_text(changes)}"
    )
    return ResumePoint(path, step, changes, progress)


def trim_metrics(output_dir: Path, step: int) -> None:
    """Drop the rows of steps after `step` from metrics.jsonl (rank 0): a run that logged steps
    it never saved is resumed from `step`, which logs them again. A torn last line goes too."""
    path = Path(output_dir) / "metrics.jsonl"
    if not is_rank0() or not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    log(f"metrics.jsonl: dropped {len(lines) - len(kept)} rows after step {step} (not saved)")
