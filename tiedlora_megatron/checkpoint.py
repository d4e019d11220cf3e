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

Loads are verified. `tiedlora.json` (format 2) lists every stored item, read back from disk
after the save: each tensor's global shape, dtype and sha256 (of the whole tensor, so the same
adapter saved at any layout has the same digests), each object item's sha256, and megatron's own
files'. `verify_adapter_checkpoint` checks a directory against that list without a model;
`load_adapter_checkpoint` verifies, then checks the stored tensors against the model (missing,
unexpected, wrong shape) and what it loaded against the verified tensors, and changes nothing
unless all of it holds. Format-1 checkpoints (no list) still load, with a warning that their
data could not be verified; re-save them to get the list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron import compat
from tiedlora_megatron.atomic import (
    problems_on_every_rank,
    raise_on_every_rank,
    replace_dir,
    write_json_atomic,
)
from tiedlora_megatron.config import ConfigError, TiedLoRAConfig
from tiedlora_megatron.inject import TiedLoRAAdapters, is_adapter_param
from tiedlora_megatron.optimizer_state import (
    materialise_adam_state,
    restore_adam_steps,
)
from tiedlora_megatron.params import ModelDims
from tiedlora_megatron.pipeline import unwrap
from tiedlora_megatron.stored import (
    METADATA_FILE,
    StoredDataError,
    check_extents,
    config_problems,
    describe,
    digest_problems,
    is_optimizer_key,
    listing_problems,
    load_stored,
    read_index,
    stored_shapes,
)

FORMAT_VERSION = 2
#: Formats this version loads; 1 has no list of stored tensors (loaded unverified, with a warning).
READABLE_FORMATS = (1, 2)
#: Config fields that must agree between a checkpoint and the model it is loaded into.
_MATCHING_FIELDS = ("factors", "tied", "tie_experts", "rank", "alpha", "target_modules")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


#: Adapters -> the checkpoint directory they were last loaded from (exports keep off it).
_LOADED_FROM: weakref.WeakKeyDictionary[TiedLoRAAdapters, Path] = weakref.WeakKeyDictionary()


def loaded_from(adapters: TiedLoRAAdapters) -> Path | None:
    """The checkpoint `load_adapter_checkpoint` last loaded `adapters` from, if any."""
    return _LOADED_FROM.get(adapters)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict[str, int | None]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tp": 1, "pp": 1, "vpp": None, "dp": 1, "ep": 1, "etp": 1}
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
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
    trainable = adapters.num_trainable_parameters()  # collective over the PP and EP groups
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
            meta.update(describe(partial))  # what is on disk, read back: tensors, objects, files
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
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_FORMATS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{path}: checkpoint format {version!r}, this version reads "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    return meta


def _raise(path: Path, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(
            f"{path} failed verification ({len(problems)} problem(s)); restore it from a copy or "
            "re-save it:\n  " + "\n  ".join(problems)
        )


def _verify(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, every stored item whole) of a checkpoint that passes verification."""
    meta = read_metadata(path)
    try:
        config = TiedLoRAConfig.from_dict(meta["adapter_config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / METADATA_FILE}: unreadable adapter config ({e})") from None
    try:
        index = read_index(path)
        check_extents(path, index)
    except StoredDataError as e:
        _raise(path, [str(e)])
    stored = stored_shapes(index)
    if "tensors" in meta:
        problems = listing_problems(meta, stored)
    elif meta["format_version"] >= 2:
        problems = [f"{METADATA_FILE} of format {meta['format_version']} lacks its list of tensors"]
    else:
        problems = []
    adapter_keys = [
        k for k in stored if not is_optimizer_key(k) and not compat.is_common_state_key(k)
    ]
    _raise(path, problems + config_problems(config, adapter_keys))
    try:
        data = load_stored(path, index)
    except StoredDataError as e:
        _raise(path, [str(e)])
    if "tensors" not in meta:
        warnings.warn(
            f"{path}: format-1 checkpoint without a list of stored tensors and digests: its "
            "data was read but cannot be checked against the save; re-save it to verify it",
            stacklevel=3,
        )
    else:
        _raise(path, digest_problems(meta, path, data))
    return meta, data


def verify_adapter_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint directory on its own (no model, no process group) and return its
    metadata; raise CheckpointError naming every problem: metadata missing or unparseable, its
    adapter config not accounting for a stored tensor, a listed tensor not stored or a stored one
    not listed, a missing or truncated data file, unreadable data, a content digest mismatch.

    Reads every stored tensor once (cheap at adapter size). Format-1 checkpoints have no list:
    they pass with a warning when their data is readable and fits their config."""
    return _verify(Path(path))[0]


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


def _raise_everywhere(path: Path, problems: list[str]) -> None:
    problems = problems_on_every_rank(problems)
    if problems:
        raise CheckpointError(
            f"{path} does not load into this model ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )


def _stored_pieces(entry) -> list:
    """The ShardedTensors an entry of the model's sharded state dict is stored as (a factory,
    e.g. a SwiGLU fc1's [gate; up] split, builds several)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        return [p for built in nested_values(entry.build()) for p in _stored_pieces(built)]
    return [entry] if isinstance(entry, ShardedTensor) else []


def _expected_value(entry) -> Any:
    """How to compute, from the stored full tensors, what loading `entry` must give: the slice
    of a ShardedTensor, or a factory's pieces merged as megatron merges them on load."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        built, merge = entry.build(), entry.merge_fn
        return lambda data: merge(
            dict_list_map_inplace(lambda sh: data[sh.key][sh.global_slice()], built)
        )
    key, where = entry.key, entry.global_slice()
    return lambda data: data[key][where]


def _model_problems(sharded: dict[str, dict[str, Any]], data: dict[str, Any]) -> list[str]:
    """The stored adapter tensors against the ones the model (all ranks together) expects."""
    expected = {
        sh.key: tuple(sh.global_shape)
        for part in sharded.values()
        for entry in part.values()
        for sh in _stored_pieces(entry)
    }
    if dist.is_initialized() and dist.get_world_size() > 1:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, expected)
        expected = {k: v for rank in every for k, v in rank.items()}
    stored = {
        k: tuple(v.shape)
        for k, v in data.items()
        if not is_optimizer_key(k) and isinstance(v, torch.Tensor)
    }
    problems = [
        f"missing: {k!r} (shape {v}) is not stored" for k, v in expected.items() if k not in stored
    ]
    problems += [
        f"unexpected: stored {k!r} has no place in the model" for k in stored if k not in expected
    ]
    problems += [
        f"wrong shape: {k!r} stored {stored[k]}, model {v}"
        for k, v in expected.items()
        if k in stored and stored[k] != v
    ]
    return problems


def _loaded_problems(pieces: dict, state: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """What this rank loaded against its slice of the verified tensors."""
    problems = []
    for (part, name), (key, expected) in pieces.items():
        got = state[part][name].detach().cpu()
        want = expected(data)
        if tuple(want.shape) != tuple(got.shape) or not torch.equal(want, got):
            problems.append(f"digest mismatch after load: {key!r} loaded differs from the stored")
    return problems


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

    Verified: every rank checks the directory (`verify_adapter_checkpoint`), the config and
    dims, the stored adapter tensors against the model's (missing, unexpected, wrong shape) and
    what it loaded against the verified tensors; any problem raises CheckpointError on every rank
    before a parameter changes. Collective: every rank calls it with the same arguments."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    path = Path(path)
    meta, data = _verify(path)
    check_compatible(meta, adapters.config, model_dims(chunks), path)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise CheckpointError(f"{path} holds no optimizer state (saved without an optimizer)")
    if optimizer is not None:
        _check_restorable(optimizer)
        materialise_adam_state(optimizer)
    sharded = adapter_sharded_state_dict(chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=_optimizer_metadata(optimizer)
        )
    pieces = {  # before the load, which builds the factories in place
        (f"model{i}", name): (entry.key, _expected_value(entry))
        for i in range(len(chunks))
        for name, entry in sharded[f"model{i}"].items()
    }
    model_part = {k: v for k, v in sharded.items() if k != "optimizer"}
    _raise_everywhere(path, _model_problems(model_part, data))
    state = compat.load_dist_checkpoint(sharded, path)  # also one the other megatron release wrote
    _raise_everywhere(path, _loaded_problems(pieces, state, data))
    for i, chunk in enumerate(chunks):
        loaded = state[f"model{i}"]
        params = dict(unwrap(chunk).named_parameters())
        with torch.no_grad():
            for key, value in loaded.items():
                params[key].copy_(value)
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into its fp32 main params
            optimizer.load_state_dict(state["optimizer"])
        restore_adam_steps(optimizer, state["optimizer"])
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    _LOADED_FROM[adapters] = path
    return meta
