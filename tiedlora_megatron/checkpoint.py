"""Adapter-only distributed checkpoints: save, load, resume and reshard.

A checkpoint is a directory written by megatron-core's `dist_checkpointing` holding only the
adapter tensors (per-layer u, v stacked over global layers; tied A, B stored once) and,
optionally, the optimizer state, plus `tiedlora.json`: the adapter config, the base model's
dims, the layout it was saved at, the step and the LR-scheduler state. Tensors are stored by
global shape, so a checkpoint saved at one (TP, PP, VPP, DP) layout loads at any other.

Writes are atomic: everything goes to a hidden `.<name>.partial` directory, `tiedlora.json` is
written last, and only then is the directory renamed to its final name. A save that dies midway
leaves the previous checkpoint untouched and a partial directory that `load` rejects. An
existing checkpoint is never replaced unless `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.atomic import raise_on_every_rank, replace_dir, write_json_atomic
from tiedlora_megatron.config import ConfigError, TiedLoRAConfig
from tiedlora_megatron.inject import TiedLoRAAdapters, is_adapter_param
from tiedlora_megatron.params import ModelDims
from tiedlora_megatron.pipeline import unwrap

METADATA_FILE = "tiedlora.json"
FORMAT_VERSION = 1
#: Config fields that must agree between a checkpoint and the model it is loaded into.
_MATCHING_FIELDS = ("factors", "tied", "rank", "alpha", "target_modules")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict[str, int | None]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tp": 1, "pp": 1, "vpp": None, "dp": 1}
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def model_dims(chunks: Sequence[nn.Module]) -> ModelDims:
    """The dims of the (first) chunk's megatron TransformerConfig."""
    config = getattr(unwrap(chunks[0]), "config", None)
    if config is None:
        raise TypeError("model chunk has no megatron `config`; cannot record its dims")
    return ModelDims.from_transformer_config(config)


def adapter_sharded_state_dict(chunks: Sequence[nn.Module]) -> dict[str, dict[str, Any]]:
    """Per chunk (`model0`, `model1`, ...), the adapter entries of megatron's sharded state
    dict: the model's own recursion, so layer offsets and TP sharding are megatron's."""
    out = {}
    for i, chunk in enumerate(chunks):
        full = unwrap(chunk).sharded_state_dict()
        out[f"model{i}"] = {k: v for k, v in full.items() if is_adapter_param(k)}
    return out


def _optimizer_metadata(optimizer) -> dict[str, str]:
    # 'dp_reshardable' is the distributed optimizer's format that round-trips on megatron-core
    # 0.16 (the default 'fully_sharded_model_space' fails there); the others ignore it.
    return {"distrib_optim_sharding_type": "dp_reshardable"}


def save_adapter_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | Sequence[nn.Module],
    adapters: TiedLoRAAdapters,
    *,
    optimizer=None,
    scheduler=None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the adapters (and optimizer / scheduler state) to directory `path`, atomically.

    Collective: every rank calls it with the same arguments."""
    from megatron.core import dist_checkpointing

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    partial = final.parent / f".{final.name}.partial"
    if _rank() == 0:
        if partial.exists():
            shutil.rmtree(partial)  # left by an interrupted save of this same checkpoint
        partial.mkdir(parents=True)
    _barrier()

    sharded = adapter_sharded_state_dict(chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, metadata=_optimizer_metadata(optimizer)
        )
    dist_checkpointing.save(sharded, str(partial))
    _barrier()
    trainable = adapters.num_trainable_parameters()  # collective over the pipeline group
    error = None
    if _rank() == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "adapter_config": adapters.config.to_dict(),
            "model_dims": dataclasses.asdict(model_dims(chunks)),
            "layout": _layout(),
            "step": step,
            "has_optimizer": optimizer is not None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "trainable_parameters": trainable,
            "extra": extra or {},
        }
        try:
            write_json_atomic(partial / METADATA_FILE, meta)
            replace_dir(partial, final)
        except Exception as e:  # every rank must learn of it, or the others would go on
            error = e
    raise_on_every_rank(error, f"saving {final} failed on rank 0")
    return final


def _check_restorable(optimizer) -> None:
    """megatron-core rebuilds optimizer state before loading into it only for Adam (its
    `init_state_fn`); say so instead of failing inside megatron."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "init_state_fn", None) is None:
            name = type(getattr(inner, "optimizer", inner)).__name__
            raise CheckpointError(
                f"cannot restore the state of a {name} optimizer: megatron-core restores "
                "optimizer state for Adam only; load the adapters without `optimizer=`"
            )


def _materialise_adam_state(optimizer) -> None:
    """Give a never-stepped torch Adam the state entries it creates lazily on its first step.

    Without apex / TE, megatron's DistributedOptimizer falls back to torch Adam and reads each
    state's "step" when building its state dict, so loading into a fresh optimizer would fail.
    The entries are overwritten by the loaded state."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if state:
                    continue
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )


def _restore_adam_steps(optimizer, loaded: dict[str, Any]) -> None:
    """Give each torch-Adam parameter state its own step tensor with the saved step.

    Without apex / TE, megatron's DistributedOptimizer keeps the step in its param groups and,
    on load, leaves torch Adam's per-parameter steps at their pre-load value, sharing one
    tensor among all parameters (torch Adam increments each in place, so a shared one would
    advance once per parameter per step)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    if "optimizer" in loaded:
        states = [loaded]
    elif all(str(k).isdigit() for k in loaded):  # a chain of several optimizers
        states = [loaded[k] for k in sorted(loaded, key=int)]
    else:
        return
    for inner, inner_state in zip(inners, states, strict=False):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(inner, DistributedOptimizer) or not isinstance(
            torch_opt, torch.optim.Adam | torch.optim.AdamW
        ):
            continue
        groups = inner_state.get("optimizer", {}).get("param_groups", [])
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in torch_opt.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(step, dtype=torch.float32)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a complete checkpoint; CheckpointError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path}: not a complete Tied-LoRA checkpoint (no {METADATA_FILE}; an interrupted "
            "save leaves such a directory)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file}: corrupt metadata ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}"
        )
    return meta


def check_compatible(
    meta: dict[str, Any], config: TiedLoRAConfig, dims: ModelDims, path: Path
) -> None:
    """Raise CheckpointError naming every config field or model dim that differs."""
    try:
        saved = TiedLoRAConfig.from_dict(meta["adapter_config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable adapter config in metadata ({e})") from None
    problems = [
        f"{f}: checkpoint {getattr(saved, f)!r}, model {getattr(config, f)!r}"
        for f in _MATCHING_FIELDS
        if getattr(saved, f) != getattr(config, f)
    ]
    saved_dims = meta.get("model_dims", {})
    problems += [
        f"model {k}: checkpoint {saved_dims.get(k)!r}, model {v!r}"
        for k, v in dataclasses.asdict(dims).items()
        if saved_dims.get(k) != v
    ]
    if problems:
        raise CheckpointError(f"{path} does not fit this model:\n  " + "\n  ".join(problems))


def load_adapter_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | Sequence[nn.Module],
    adapters: TiedLoRAAdapters,
    *,
    optimizer=None,
    scheduler=None,
) -> dict[str, Any]:
    """Load adapters (and optimizer / scheduler state when given) saved at any layout into the
    current one. Returns the checkpoint's metadata (its "step" is where to resume).

    Collective: every rank calls it with the same arguments."""
    from megatron.core import dist_checkpointing

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    path = Path(path)
    meta = read_metadata(path)
    check_compatible(meta, adapters.config, model_dims(chunks), path)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise CheckpointError(f"{path} holds no optimizer state (saved without an optimizer)")
    if optimizer is not None:
        _check_restorable(optimizer)
        _materialise_adam_state(optimizer)
    sharded = adapter_sharded_state_dict(chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=_optimizer_metadata(optimizer)
        )
    state = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(chunks):
        loaded = state[f"model{i}"]
        params = dict(unwrap(chunk).named_parameters())
        with torch.no_grad():
            for key, value in loaded.items():
                params[key].copy_(value)
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into its fp32 main params
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer, state["optimizer"])
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    return meta
