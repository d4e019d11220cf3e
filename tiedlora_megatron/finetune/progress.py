"""What a running job reports: a log line with rate and ETA, the wall time of each phase (so no
figure mixes training with loading or evaluation), and scalars for plotting.

Logging and scalars act on global rank 0 only. Scalars always go to `metrics.jsonl` (one JSON object per line,
readable with pandas or `jq`) and, when the `tensorboard` package is installed, to TensorBoard
event files in the same directory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message: str) -> None:
    """Print on rank 0 (flushed: torchrun buffers children's output otherwise)."""
    if is_rank0():
        print(message, flush=True)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Step timing since the (re)start, for tokens/s, seconds per step and the ETA."""

    def __init__(self, first_step: int, total_steps: int):
        self.first_step = first_step
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.tokens = 0

    def line(self, step: int, tokens: int, values: dict[str, float]) -> str:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        per_step = elapsed / max(done, 1)
        eta = per_step * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in values.items()]
        parts += [
            f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s",
            f"{per_step:.2f} s/step",
            f"ETA {format_seconds(eta)}",
        ]
        return " | ".join(parts)


class PhaseTimes:
    """Seconds spent in each named phase of this run (load, base_eval, train, validation, save,
    final_eval); a phase entered several times accumulates."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


_PHASE_LABELS = {
    "load": "load",
    "base_eval": "base eval",
    "train": "train",
    "validation": "validation",
    "save": "save",
    "final_eval": "tuned eval",
}


def timing_text(summary: dict[str, Any]) -> str:
    """The closing time line: each phase on its own, training per step over every run of the
    job (a resumed run adds to the time its checkpoint recorded), and the whole of this run."""
    seconds = summary["seconds"]
    steps, this_run = summary["steps"], summary["steps_this_run"]
    train = summary["train_seconds"]
    per_step = f"{train / steps:.2f} s/step" if steps and train > 0 else "? s/step"
    resumed = f", {this_run} this run" if this_run != steps else ""
    parts = []
    for phase, label in _PHASE_LABELS.items():
        if phase == "train":
            parts.append(f"train {format_seconds(train)} ({steps} steps, {per_step}{resumed})")
        elif seconds.get(phase):
            parts.append(f"{label} {format_seconds(seconds[phase])}")
    return "time: " + " | ".join(parts) + f" | this run {format_seconds(summary['job_seconds'])}"


class Scalars:
    """Append-only scalar log (metrics.jsonl, plus TensorBoard when available) on rank 0. A
    resumed run starts at `first_step`: TensorBoard drops the events an earlier run logged from
    there on (metrics.jsonl is trimmed by `checkpoints.trim_metrics`), so no step is plotted twice."""

    def __init__(self, output_dir: Path, first_step: int = 0):
        self._file = None
        self._tb = None
        if not is_rank0():
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._file = (output_dir / "metrics.jsonl").open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(output_dir / "tensorboard"), purge_step=first_step + 1 if first_step else None
            )
        except ImportError:  # tensorboard not installed: metrics.jsonl only
            self._tb = None

    def add(self, step: int, values: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
