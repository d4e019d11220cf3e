"""Writing an export: gathering to rank 0, and the rules that keep an export from destroying
anything.

- The output directory must not be, lie inside, or contain the base model or the adapter
  checkpoint (symlinks resolved): an export there, or the replacement of one, could delete them.
- An existing output is replaced only with `overwrite`, and only when it is an export this tool
  wrote, recognised by the marker file (`MARKER_FILE`: what was exported, from what, when)
  written into every export. Anything else is refused, saying why.
- The replacement is atomic: rank 0 writes the whole new export to a hidden `.<name>.partial`
  directory, the marker last, and only then swaps it in (`atomic.replace_dir`); the old export
  is removed after the new one is in place, never before it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.atomic import raise_on_every_rank, replace_dir
from tiedlora_megatron.export_names import ExportError, check_adapters
from tiedlora_megatron.inject import TiedLoRAAdapters
from tiedlora_megatron.models.arch import GPTArch

#: Written into every export; `overwrite` replaces only a directory that has it.
MARKER_FILE = ".tiedlora_export.json"
MARKER_TOOL = "tiedlora-megatron export"


# -- gathering ---------------------------------------------------------------------------------


def _writes(experts: bool = False) -> bool:
    """Whether this rank's gathered tensors are sent to rank 0 (one copy per pipeline stage;
    routed experts' tensors: one copy per expert, from its first expert-data-parallel rank)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    if experts:
        return ps.get_expert_data_parallel_rank() == 0
    return (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    )


def to_rank0(tensors: dict[str, torch.Tensor], experts: bool = False) -> dict[str, torch.Tensor]:
    """All ranks' tensors on global rank 0 (elsewhere: empty); `experts`: routed experts' (see
    `_writes`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensors
    mine = tensors if _writes(experts) else {}
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        out.update(part)
    return out


def _agree(error: Exception | None) -> None:
    """Raise on every rank if any rank found a problem (a lone raise would hang the others)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    if error is not None:
        raise error
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise ExportError(first)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# -- where an export may go --------------------------------------------------------------------


def _scratch(final: Path) -> dict[str, Path]:
    """The directories an export writes or removes: its own, and the partial / old beside it."""
    return {
        "output directory": final,
        "partial directory": final.parent / f".{final.name}.partial",
        "replaced-export directory": final.parent / f".{final.name}.old",
    }


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of an export this tool wrote at `directory`, or None."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == MARKER_TOOL else None


def check_destination(final: Path, overwrite: bool, protected: Mapping[str, Path]) -> None:
    """Raise unless an export may be written to `final` (see the module doc). `protected`:
    description -> a path nothing may be written into or over (base model, adapter checkpoint)."""
    for what, path in protected.items():
        target = Path(os.path.realpath(path))
        for role, place in _scratch(final).items():
            place_real = Path(os.path.realpath(place))
            if place_real == target:
                relation = "is"
            elif target in place_real.parents:
                relation = "is inside"
            elif place_real in target.parents:
                relation = "contains"
            else:
                continue
            raise ExportError(
                f"the {role} {place} (resolved: {place_real}) {relation} the {what} {path} "
                f"(resolved: {target}); writing or replacing it could destroy the {what}: "
                "choose an output directory outside it"
            )
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{final} exists; pass overwrite=True (CLI: --overwrite) to replace it, which is "
            "allowed for an earlier export of this tool only"
        )
    if final.is_symlink():
        raise ExportError(
            f"{final} is a symbolic link; overwrite replaces only an export directory itself: "
            "give the directory's real path or another output directory"
        )
    if not final.is_dir():
        raise ExportError(
            f"{final} is a file, not an export directory; overwrite replaces only an earlier "
            "export of this tool: remove it yourself or choose another output directory"
        )
    if read_marker(final) is None:
        raise ExportError(
            f"{final} was not written by this tool (no readable {MARKER_FILE} in it), so "
            "overwrite will not replace it: remove or rename it yourself, or choose another "
            "output directory"
        )


def prepare(
    out_dir: str | os.PathLike,
    overwrite: bool,
    adapters: TiedLoRAAdapters,
    chunks: Sequence[nn.Module],
    arch: GPTArch,
    protected: Mapping[str, Path],
) -> Path:
    """Check the output directory and the adapters on every rank; raise on all ranks if any
    rank found a problem. Returns the final directory."""
    error = None
    final = Path(out_dir)
    try:
        check_destination(final, overwrite, protected)
        check_adapters(adapters, chunks, arch)
    except (ExportError, FileExistsError) as e:
        error = e
    _agree(error)
    return final


def write_export(
    final: Path, write: Callable[[Path], None], marker: dict[str, Any], overwrite: bool
) -> Path:
    """Rank 0 runs `write(partial)`, adds the marker, and swaps the directory into place;
    errors reach all ranks."""
    error = None
    if _rank() == 0:
        partial = _scratch(final)["partial directory"]
        try:
            if partial.exists():
                shutil.rmtree(partial)  # left by an interrupted export to this same directory
            partial.mkdir(parents=True)
            write(partial)
            files = sorted(p.name for p in partial.iterdir())
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            record = {"tool": MARKER_TOOL, "written_at": stamp, "files": files, **marker}
            (partial / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n")
            # Checked again right before the swap: the directory may have appeared meanwhile.
            check_destination(final, overwrite, {})
            replace_dir(partial, final)
        except Exception as e:  # every rank must learn of it
            error = e
            shutil.rmtree(partial, ignore_errors=True)  # the old export, if any, is untouched
    raise_on_every_rank(error, f"writing {final} failed on rank 0")
    return final


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from tiedlora_megatron.models.hf import require

    require("safetensors", "safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
