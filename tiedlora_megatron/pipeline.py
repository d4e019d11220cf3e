"""Keeping the tied factors' replicas identical across pipeline stages and virtual chunks.

Every pipeline stage and every virtual chunk holds its own replica of each tied A and B (its
chunk's `TiedFactorBank`). The replicas start identical (seeded independently of the layout) and
stay identical because each step, after data-parallel reduction and before the optimizer, the
gradient of every replica is replaced by the sum over all replicas (local chunks, then the
pipeline group). `finalize_model_grads` here is megatron-core's with that sum added: set it as
`config.finalize_model_grads_func`.

Two megatron attributes make this exact with every optimizer:
- `shared = True` on every replica but the primary one (first stage, first chunk): grad-norm
  clipping counts a tied factor once, as megatron does for a tied embedding's second copy.
- `shared_embedding = True` on every replica: with the distributed optimizer each gets its own
  gradient bucket, so every stage shards it over data-parallel ranks identically and the
  pipeline sum of the reduce-scattered gradient is right on each rank's shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from tiedlora_megatron.factors import BANK_ATTR, TiedFactorBank


def unwrap(chunk: nn.Module) -> nn.Module:
    """The model under DDP / Float16Module wrappers (megatron wraps with `.module`)."""
    while hasattr(chunk, "module") and isinstance(chunk.module, nn.Module):
        chunk = chunk.module
    return chunk


def tied_banks(model: nn.Module | Sequence[nn.Module]) -> list[TiedFactorBank]:
    """The TiedFactorBank of each local model chunk that has one, in chunk order."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    banks = [getattr(unwrap(c), BANK_ATTR, None) for c in chunks]
    return [b for b in banks if b is not None]


def pipeline_rank_and_group() -> tuple[int, dist.ProcessGroup | None]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return 0, None
    return ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_group()


def mark_tied_replicas(chunks: Sequence[nn.Module]) -> None:
    """Set megatron's `shared` / `shared_embedding` attributes on the tied replicas of this rank.

    The primary replica is the one of the first pipeline stage's first virtual chunk (a chunk's
    `vp_stage`, else its index in `chunks`). Called by `apply_tied_lora`, before DDP wraps the
    model: DDP reads `shared_embedding` when it lays out its buckets.
    """
    pp_rank, _ = pipeline_rank_and_group()
    for index, chunk in enumerate(chunks):
        bank = getattr(unwrap(chunk), BANK_ATTR, None)
        if bank is None:
            continue
        vp_stage = getattr(unwrap(chunk), "vp_stage", None)
        primary = pp_rank == 0 and (index if vp_stage is None else vp_stage) == 0
        for p in bank.parameters():
            p.shared_embedding = True
            p.shared = not primary


def _grad(p: nn.Parameter) -> torch.Tensor | None:
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def sync_tied_factor_grads(model: nn.Module | Sequence[nn.Module]) -> None:
    """Replace each tied replica's gradient by the sum over all replicas (local chunks and the
    pipeline group). Call after data-parallel gradient reduction, before the optimizer step."""
    banks = tied_banks(model)
    _, group = pipeline_rank_and_group()
    if not banks or (len(banks) == 1 and group is None):
        return
    replicas: dict[str, list[torch.Tensor]] = {}
    for bank in banks:
        for name, p in bank.named_parameters():
            if p.requires_grad and _grad(p) is not None:
                replicas.setdefault(name, []).append(_grad(p))
    if not replicas:
        return
    names = sorted(replicas)
    totals = [
        torch.stack(replicas[n]).sum(0) if len(replicas[n]) > 1 else replicas[n][0].clone()
        for n in names
    ]
    if group is not None:
        flat = _flatten_dense_tensors(totals)
        dist.all_reduce(flat, group=group)
        totals = list(_unflatten_dense_tensors(flat, totals))
    for name, total in zip(names, totals, strict=True):
        for g in replicas[name]:
            g.copy_(total)


def finalize_model_grads(model: list[nn.Module], *args, **kwargs) -> None:
    """megatron-core's `finalize_model_grads`, then the sum of tied-factor gradients over all
    replicas. Same signature; use as `config.finalize_model_grads_func`."""
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    megatron_finalize(model, *args, **kwargs)
    sync_tied_factor_grads(model)
