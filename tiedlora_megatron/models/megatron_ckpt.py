"""megatron-core `dist_checkpointing` checkpoints of loaded base models, at any TP / PP.

A checkpoint holds each chunk's sharded state dict under megatron-LM's keys (`model`, or
`model0`, `model1`, ... with virtual pipeline stages) plus the `GPTArch` and padded vocabulary
size in the common state, so it can be rebuilt and resharded without the original HF / GGUF files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tiedlora_megatron.models.arch import GPTArch, ModelInfo, build_model

ARCH_KEY = "tiedlora_arch"


def _chunk_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def save_megatron_checkpoint(chunks: list, arch: GPTArch, path: str | os.PathLike) -> None:
    """Save the model as a megatron dist checkpoint (collective: every rank must call it)."""
    from megatron.core import dist_checkpointing

    Path(path).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {k: c.sharded_state_dict() for k, c in zip(_chunk_keys(chunks), chunks, strict=True)}
    padded = chunks[0].vocab_size
    state[ARCH_KEY] = json.dumps({"arch": arch.to_dict(), "padded_vocab_size": padded})
    dist_checkpointing.save(state, str(path))


def read_checkpoint_arch(path: str | os.PathLike) -> tuple[GPTArch, int]:
    """The architecture and padded vocabulary size stored in a checkpoint by this module."""
    from megatron.core import dist_checkpointing

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"megatron checkpoint directory does not exist: {p}")
    if not dist_checkpointing.check_is_distributed_checkpoint(str(p)):
        raise ValueError(f"{p} is not a megatron dist checkpoint (no valid metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(p))
    if ARCH_KEY not in common:
        raise ValueError(
            f"{p} has no {ARCH_KEY!r} entry: it was not saved by save_megatron_checkpoint, so "
            f"its architecture is unknown (common keys: {sorted(common)})"
        )
    meta = json.loads(common[ARCH_KEY])
    return GPTArch.from_dict(meta["arch"]), int(meta["padded_vocab_size"])


def load_megatron_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Build this rank's chunks for a checkpoint saved at any TP / PP and load it; (chunks, info)."""
    from megatron.core import dist_checkpointing

    arch, padded = read_checkpoint_arch(path)
    chunks = build_model(arch, dtype, padded_vocab_size=padded)
    keys = _chunk_keys(chunks)
    sharded = {k: c.sharded_state_dict() for k, c in zip(keys, chunks, strict=True)}
    loaded = dist_checkpointing.load(sharded, str(path))
    for key, chunk in zip(keys, chunks, strict=True):
        chunk.load_state_dict(loaded[key], strict=True)
    return chunks, ModelInfo(arch=arch, path=str(path), format="megatron")
