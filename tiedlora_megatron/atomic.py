"""Writes that an interruption cannot leave half-done, and failures every rank hears of.

A checkpoint or export directory is written under a hidden `.<name>.partial` name and renamed
into place only when complete; a file is written beside its target and `os.replace`d. When
rank 0 alone does the final step, its failure is broadcast so that no other rank goes on (or
waits) as if it had succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist


class CollectiveError(RuntimeError):
    """Raised on every rank but rank 0 when rank 0 failed a step of a collective write."""


def raise_on_every_rank(error: Exception | None, what: str) -> None:
    """Re-raise rank 0's `error` there and raise a CollectiveError naming it on the others."""
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise CollectiveError(f"{what}: {message[0]}")


def problems_on_every_rank(
    problems: list[str], group: dist.ProcessGroup | None = None
) -> list[str]:
    """Every rank's `problems` on every rank of `group` (rank order, without repeats), so that
    all ranks raise together, before any of them changes state, even where only some found one."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return problems
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, problems, group=group)
    return list(dict.fromkeys(p for rank in every for p in rank))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line; the file is complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move complete checkpoint `src` to `dst`; an existing `dst` is removed only after."""
    old = dst.parent / f".{dst.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old.exists():
        shutil.rmtree(old)
