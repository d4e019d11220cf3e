"""What a `dist_checkpointing` (torch_dist) directory stores, read in one process without a model.

megatron-core writes a checkpoint as torch-distributed-checkpoint data files (`*.distcp`), their
index (`.metadata`: every item's global shape, dtype and the file, offset and length of each
stored chunk) and megatron's own `common.pt` / `metadata.json`. This module reads that index,
checks that the data files hold every byte it points at, loads every stored tensor whole (its
chunks reassembled, so the result does not depend on the TP / PP layout of the save) and
digests the contents: sha256 of a tensor's bytes in C order, of an object item's stored bytes,
and of megatron's small files as they are.

Everything here is single-process and cheap at adapter size; errors are `StoredDataError`
naming the file or key. The `*_problems` checks compare the metadata's list (and its adapter
config) with what is stored, returning one line per problem.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tiedlora_megatron.config import TiedLoRAConfig
from tiedlora_megatron.experts import parse_bank_key, target_kind

#: megatron-core's own files beside the torch-distributed data, digested as they are.
MEGATRON_FILES = ("common.pt", "metadata.json")
#: The Tied-LoRA metadata of a checkpoint, with the list of what it stores.
METADATA_FILE = "tiedlora.json"
#: Stored keys of optimizer state: megatron's `optimizer.` or, for a ChainedOptimizer (dense and
#: expert parameters of an MoE model), `chained_<i>.optimizer.`; the others are adapter tensors.
_OPTIMIZER_KEY = re.compile(r"^(?:chained_\d+\.)?optimizer\.")


def is_optimizer_key(key: str) -> bool:
    return _OPTIMIZER_KEY.match(key) is not None


class StoredDataError(ValueError):
    """A checkpoint directory whose stored data is missing, truncated or unreadable."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (C order, its own dtype): the same for the same values at
    any layout."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path))


def read_index(path: Path):
    """The torch-distributed-checkpoint metadata of `path` (its `.metadata` file)."""
    index_file = path / ".metadata"
    if not index_file.is_file():
        raise StoredDataError(
            f"{path}: no tensor index ({index_file.name}); the save is incomplete"
        )
    try:
        return _reader(path).read_metadata()
    except Exception as e:  # a truncated or garbled pickle raises anything
        raise StoredDataError(
            f"{index_file}: unreadable tensor index ({type(e).__name__}: {e})"
        ) from None


def _is_tensor(item) -> bool:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return isinstance(item, TensorStorageMetadata)


def check_extents(path: Path, index) -> None:
    """Every data file the index points at exists and is long enough for every chunk in it."""
    needed: dict[str, int] = {}
    owners: dict[str, str] = {}
    for where, info in index.storage_data.items():
        end = info.offset + info.length
        if end > needed.get(info.relative_path, -1):
            needed[info.relative_path] = end
            owners[info.relative_path] = where.fqn
    problems = []
    for name, end in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{f}: missing data file (holds {owners[name]!r})")
        elif f.stat().st_size < end:
            problems.append(
                f"{f}: truncated data file ({f.stat().st_size} bytes, the index needs {end}; "
                f"holds {owners[name]!r})"
            )
    if problems:
        raise StoredDataError("\n  ".join(problems))


def stored_shapes(index) -> dict[str, tuple[tuple[int, ...], str] | None]:
    """Stored key -> (global shape, dtype name) of a tensor, None for an object item."""
    out: dict[str, tuple[tuple[int, ...], str] | None] = {}
    for key, item in index.state_dict_metadata.items():
        if _is_tensor(item):
            out[key] = (tuple(item.size), str(item.properties.dtype).removeprefix("torch."))
        else:
            out[key] = None
    return out


def _object_bytes(path: Path, index, key: str) -> bytes:
    parts = []
    for where, info in sorted(index.storage_data.items(), key=lambda kv: str(kv[0])):
        if where.fqn == key:
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                parts.append(f.read(info.length))
    return b"".join(parts)


def load_stored(path: Path, index) -> dict[str, torch.Tensor | bytes]:
    """Every stored item whole: tensors reassembled from their chunks, objects as raw bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    tensors = {
        key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in index.state_dict_metadata.items()
        if _is_tensor(item)
    }
    try:
        if tensors:
            import warnings

            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(tensors, storage_reader=_reader(path), no_dist=True)
    except (Exception, CheckpointException) as e:  # a garbled chunk fails with anything
        cause = next(iter(getattr(e, "failures", {}).values()), e)  # torch's per-rank failures
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise StoredDataError(
            f"{path}: corrupt tensor data ({type(cause).__name__}: {first})"
        ) from None
    out: dict[str, torch.Tensor | bytes] = dict(tensors)
    for key, item in index.state_dict_metadata.items():
        if not _is_tensor(item):
            out[key] = _object_bytes(path, index, key)
    return out


def describe(path: str | Path) -> dict[str, Any]:
    """{"tensors": {key: {"shape", "dtype", "sha256"}}, "objects": {key: {"bytes", "sha256"}},
    "files": {megatron file: sha256}} of the checkpoint at `path`, read back from disk."""
    path = Path(path)
    index = read_index(path)
    check_extents(path, index)
    tensors, objects = {}, {}
    for key, value in load_stored(path, index).items():
        if isinstance(value, torch.Tensor):
            tensors[key] = {
                "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch."),
                "sha256": tensor_digest(value),
            }
        else:
            objects[key] = {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    files = {
        name: hashlib.sha256((path / name).read_bytes()).hexdigest()
        for name in MEGATRON_FILES
        if (path / name).is_file()
    }
    return {"tensors": tensors, "objects": objects, "files": files}


# -- the metadata's list against the store -------------------------------------------------


#: A tied factor (`tied_adapter.<kind>.<f>`) and a per-layer one (`...<kind>_adapter[.x].<f>`).
_TIED_KEY = re.compile(r"^tied_adapter\.(\w+)\.(\w+)$")
_LAYER_KEY = re.compile(r"(?:^|\.)(\w+)_adapter\.(?:.*\.)?(\w+)$")


def config_problems(config: TiedLoRAConfig, keys: Sequence[str]) -> list[str]:
    """Stored adapter tensors that the metadata's adapter config does not account for (a
    metadata naming fewer targets or factors than were saved would silently drop them)."""
    targets, kinds, problems = set(config.target_modules), set(), []
    for key in keys:
        tied = _TIED_KEY.match(key)
        match = tied or _LAYER_KEY.search(key)
        if match is None:
            problems.append(f"stored tensor {key!r} is not an adapter tensor")
            continue
        kind, factor = match.groups()
        kind = parse_bank_key(kind)[0] if tied else target_kind(key[: match.end(1)])
        kinds.add(kind)
        if kind not in targets:
            problems.append(
                f"stored tensor {key!r}: target {kind!r} is not in the metadata's "
                f"target_modules {sorted(targets)}"
            )
        elif tied is not None and not config.tied:
            problems.append(f"stored tensor {key!r}: a tied factor, but the metadata says untied")
        elif tied is None and factor in ("A", "B") and config.tied:
            problems.append(
                f"stored tensor {key!r}: a per-layer {factor}, but the metadata says tied"
            )
        elif tied is None and factor in ("u", "v") and not config.uses(factor):
            problems.append(
                f"stored tensor {key!r}: factor {factor!r} is not in the metadata's factors "
                f"{config.factors!r}"
            )
    problems += [
        f"target {kind!r} is in the metadata's target_modules but none of its tensors is stored"
        for kind in sorted(targets - kinds)
    ]
    return problems


def listing_problems(meta: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """The metadata's list of stored items against the tensor index on disk."""
    listed, objects = meta.get("tensors"), meta.get("objects", {})
    if not isinstance(listed, dict) or not isinstance(objects, dict):
        return [f"malformed list of stored tensors in {METADATA_FILE}"]
    problems = []
    for key, entry in listed.items():
        if key not in stored:
            problems.append(f"listed tensor {key!r} is not stored (missing from the data files)")
        elif stored[key] is None:
            problems.append(f"listed tensor {key!r} is stored as an object, not a tensor")
        elif (
            not isinstance(entry, dict)
            or (tuple(entry.get("shape", ())), entry.get("dtype")) != (stored[key])
        ):
            problems.append(f"tensor {key!r}: listed as {entry}, stored as {stored[key]}")
    problems += [f"listed object {k!r} is not stored" for k in objects if k not in stored]
    problems += [
        f"stored {'object' if shape is None else 'tensor'} {k!r} is not listed in {METADATA_FILE}"
        for k, shape in stored.items()
        if k not in listed and k not in objects
    ]
    return problems


def digest_problems(meta: dict[str, Any], path: Path, data: dict[str, Any]) -> list[str]:
    """Every stored item's and megatron file's digest against the metadata's list (which
    `listing_problems` found to name exactly the stored items)."""
    listed = {**meta.get("objects", {}), **meta["tensors"]}
    files = meta.get("files", {})
    if not isinstance(files, dict):
        return [f"malformed list of files in {METADATA_FILE}"]
    problems = []
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            digest = tensor_digest(value)
        else:
            digest = hashlib.sha256(value).hexdigest()
        entry = listed.get(key)
        if not isinstance(entry, dict) or digest != entry.get("sha256"):
            problems.append(f"{key!r}: content digest mismatch (data changed since the save)")
    for name, digest in files.items():
        f = path / name
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            problems.append(f"{f}: missing, or its digest differs from the save's")
    return problems
