"""Keeping the tied factors' replicas identical across pipeline stages and virtual chunks.

Every pipeline stage and every virtual chunk holds its own replica of each tied A and B (its
chunk's `TiedFactorBank`). The replicas start identical (seeded independently of the layout) and
stay identical because each step, after data-parallel reduction and before the optimizer, the
gradient of every replica is replaced by the sum over all replicas (local chunks, then the
pipeline group), exactly once.

That sum must not depend on the trainer's cooperation: Megatron-LM's loop and Megatron-Bridge
install megatron-core's own `finalize_model_grads` (directly or as
`config.finalize_model_grads_func`, possibly after the adapters were applied), which knows
nothing of our replicas. Every megatron finalize function starts by calling
`finish_grad_sync()` on each model chunk's `DistributedDataParallel`, so the sum is fired from
there: `apply_tied_lora` wraps `DistributedDataParallel.finish_grad_sync` once per process (a
transparent wrapper that acts only on chunks holding tied replicas) and, when the last local
chunk holding a bank has finished its data-parallel reduction, sums the replicas' gradients. A
gradient hook on each replica marks the step's gradients as pending, so the sum runs once per
step however many finalize functions (ours, megatron's, a trainer's wrapper) are layered.
Summing before megatron's remaining finalisation (sequence-parallel TP all-reduce, scaling by
the token count) is exact: those are linear and act on every replica alike.

A trainer that never calls `finish_grad_sync` (no megatron DDP) and not `finalize_model_grads`
from here would step the replicas apart. That is detected, not left silent: the first forward
after an optimizer step that followed pending, unsummed gradients raises `TiedReplicaSyncError`.

Two megatron attributes make the sum exact with every optimizer:
- `shared = True` on every replica but the primary one (first stage, first chunk): grad-norm
  clipping counts a tied factor once, as megatron does for a tied embedding's second copy.
- `shared_embedding = True` on every replica: with the distributed optimizer each gets its own
  gradient bucket, so every stage shards it over data-parallel ranks identically and the
  pipeline sum of the reduce-scattered gradient is right on each rank's shard.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.factors import BANK_ATTR, TiedFactorBank

#: Attribute of a `TiedFactorBank` holding its rank's `TiedReplicas` (set by `track_replicas`).
_REPLICAS_ATTR = "tied_replicas"

#: What `configure_tied_grad_sync` switches; read when a step runs.
_SETTINGS = {"on_ddp_grad_sync": True, "guard": True}


class TiedReplicaSyncError(RuntimeError):
    """The optimizer stepped tied factors whose replicas' gradients were never summed."""


def configure_tied_grad_sync(*, on_ddp_grad_sync: bool = True, guard: bool = True) -> None:
    """Switch the automatic replica sum (fired from megatron DDP's `finish_grad_sync`) and the
    divergence guard. Both are on by default; turn the sum off only if you call
    `sync_tied_factor_grads` yourself, and the guard only if it misfires (say so in an issue)."""
    _SETTINGS.update(on_ddp_grad_sync=on_ddp_grad_sync, guard=guard)


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


class TiedReplicas:
    """This rank's replicas of the tied factors (one bank per local chunk) and their sync state.

    `pending` is set when any trained replica receives a gradient and cleared by the sum; the
    parameters' version counters at that moment tell the guard whether an optimizer step has
    happened since (every in-place update, plain or distributed optimizer, bumps them).
    """

    def __init__(self, banks: list[TiedFactorBank], group: dist.ProcessGroup | None):
        self.banks = banks
        self.group = group
        self.params = [p for b in banks for p in b.parameters() if p.requires_grad]
        self.pending = False
        self._versions: list[int] = []
        self._reduced: set[int] = set()
        for p in self.params:
            p.register_hook(self._on_grad)

    def _on_grad(self, grad: torch.Tensor) -> None:
        if not self.pending:
            self.pending = True
            self._versions = [p._version for p in self.params]

    def chunk_reduced(self, bank: TiedFactorBank) -> None:
        """A chunk's DDP finished its data-parallel reduction; sum once all local ones have."""
        self._reduced.add(id(bank))
        if len(self._reduced) == len(self.banks):
            self._reduced.clear()
            self.sum_grads()

    def sum_grads(self) -> None:
        """Replace each replica's gradient by the sum over all replicas, once per step."""
        if not self.pending:
            return
        self.pending = False
        replicas: dict[str, list[torch.Tensor]] = {}
        for bank in self.banks:
            for name, p in bank.named_parameters():
                if not p.requires_grad:
                    continue
                if _grad(p) is None:  # unused here this step (an expert that got no tokens)
                    p.grad = torch.zeros_like(p)
                replicas.setdefault(name, []).append(_grad(p))
        if not replicas:
            return
        names = sorted(replicas)
        totals = [
            torch.stack(replicas[n]).sum(0) if len(replicas[n]) > 1 else replicas[n][0].clone()
            for n in names
        ]
        if self.group is not None:
            flat = _flatten_dense_tensors(totals)
            dist.all_reduce(flat, group=self.group)
            totals = list(_unflatten_dense_tensors(flat, totals))
        for name, total in zip(names, totals, strict=True):
            for g in replicas[name]:
                g.copy_(total)

    def check_in_sync(self, *_: Any) -> None:
        """Forward pre-hook: refuse to run on replicas that an optimizer step moved apart."""
        if not (self.pending and _SETTINGS["guard"]):
            return
        if any(p._version != v for p, v in zip(self.params, self._versions, strict=True)):
            raise TiedReplicaSyncError(
                "the optimizer stepped the tied Tied-LoRA factors without summing their "
                "gradients over their replicas (pipeline stages / virtual chunks), so the "
                "replicas now differ. Wrap the model chunks in megatron-core's "
                "DistributedDataParallel and finalise gradients with any finalize_model_grads "
                "(megatron's or tiedlora_megatron's), or call "
                "tiedlora_megatron.pipeline.sync_tied_factor_grads(model) after the "
                "data-parallel gradient reduction and before optimizer.step()"
            )


def track_replicas(chunks: Sequence[nn.Module]) -> TiedReplicas | None:
    """Keep this rank's tied replicas in sync automatically (see the module docstring).

    Called by `apply_tied_lora`. Returns None where there is a single replica (no pipeline
    parallelism, one chunk): there is nothing to sum.
    """
    banks = tied_banks(chunks)
    _, group = pipeline_rank_and_group()
    _check_same_factors(banks, group)
    if not banks or (len(banks) == 1 and group is None):
        return None
    replicas = TiedReplicas(banks, group)
    for bank in banks:
        setattr(bank, _REPLICAS_ATTR, replicas)
    for chunk in chunks:
        if getattr(unwrap(chunk), BANK_ATTR, None) is not None:
            unwrap(chunk).register_forward_pre_hook(replicas.check_in_sync)
    _sum_on_ddp_grad_sync()
    return replicas


def _check_same_factors(banks: list[TiedFactorBank], group: dist.ProcessGroup | None) -> None:
    """Refuse, on every stage, stages or chunks whose tied factors differ (a model with MoE
    layers on some stages only): their replica sums would not line up."""
    mine = sorted({(n, tuple(p.shape)) for b in banks for n, p in b.named_parameters()})
    stages = [mine]
    if group is not None:
        stages = [None] * dist.get_world_size(group)
        dist.all_gather_object(stages, mine, group=group)
    if any(s != stages[0] for s in stages) or any(
        sorted((n, tuple(p.shape)) for n, p in b.named_parameters()) != mine for b in banks
    ):
        names = sorted({n.split(".")[0] for s in stages for n, _ in s})
        raise ConfigError(
            "the pipeline stages (or virtual chunks) hold different tied factors "
            f"({', '.join(names)}): every stage must have layers of every target kind (e.g. MoE "
            "layers on every stage for experts.* targets); use tied=False or other targets"
        )


def _replicas(model: nn.Module | Sequence[nn.Module]) -> TiedReplicas | None:
    banks = tied_banks(model)
    return getattr(banks[0], _REPLICAS_ATTR, None) if banks else None


def _sum_on_ddp_grad_sync() -> None:
    """Wrap `DistributedDataParallel.finish_grad_sync` (once per process) so that a chunk
    holding tied replicas reports the end of its data-parallel reduction."""
    from megatron.core.distributed import DistributedDataParallel

    original = DistributedDataParallel.finish_grad_sync
    if getattr(original, "reports_tied_replicas", False):
        return

    @functools.wraps(original)
    def finish_grad_sync(self: DistributedDataParallel, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        bank = getattr(unwrap(self.module), BANK_ATTR, None)
        replicas = getattr(bank, _REPLICAS_ATTR, None)
        if replicas is not None and _SETTINGS["on_ddp_grad_sync"]:
            replicas.chunk_reduced(bank)
        return result

    finish_grad_sync.reports_tied_replicas = True  # type: ignore[attr-defined]
    DistributedDataParallel.finish_grad_sync = finish_grad_sync


def sync_tied_factor_grads(model: nn.Module | Sequence[nn.Module]) -> None:
    """Replace each tied replica's gradient by the sum over all replicas (local chunks and the
    pipeline group), if this step's sum has not run yet. Call after data-parallel gradient
    reduction, before the optimizer step; only needed where megatron's DDP is not used."""
    replicas = _replicas(model)
    if replicas is not None:
        replicas.sum_grads()


def finalize_model_grads(model: list[nn.Module], *args: Any, **kwargs: Any) -> None:
    """megatron-core's `finalize_model_grads`, then the tied-replica sum if megatron's DDP did
    not already fire it. Same signature; megatron's own works as well since `apply_tied_lora`
    hooks its DDP, so setting this as `config.finalize_model_grads_func` is optional."""
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    megatron_finalize(model, *args, **kwargs)
    sync_tied_factor_grads(model)
