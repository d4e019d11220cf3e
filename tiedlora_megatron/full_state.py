"""Every adapter factor as one full (unsharded) tensor under a global name, at any layout.

Inside the model a factor is split over tensor-parallel ranks like its base layer, its layers
are spread over pipeline stages and virtual chunks under local indices, and every stage and
chunk holds a replica of the tied pair. `full_state_dict` undoes all of that: one full tensor
per factor, named by the global layer, the same at every (TP, PP, VPP, DP) layout and on every
rank. `load_full_state_dict` is its inverse: every rank slices its own shards out of the full
tensors. Checks and tools outside the library use these instead of re-deriving the sharding.

Keys (`<i>` is the 0-based global layer index, megatron's `layer_number - 1`; `<kind>` the
target, e.g. `linear_qkv`):
- `tied.<kind>.A` (rank x d_in), `tied.<kind>.B` (d_out x rank): the tied pair, once;
- `layers.<i>.<kind>.u` (rank), `layers.<i>.<kind>.v` (d_out): the per-layer vectors in use;
- `layers.<i>.<kind>.A`, `layers.<i>.<kind>.B`: the per-layer pair of an untied adapter (LoRA).

A routed expert's kind carries the global expert index `<e>` (experts.py): `experts.<e>.linear_fc1`
in `layers.<i>.experts.<e>.linear_fc1.u` and in `tied.experts.<e>.linear_fc1.A` (a pair per expert
index); a pair tied across experts is `tied.experts.linear_fc1.A`. Every expert-parallel rank's
experts are included.

Frozen factors are included: a frozen A or B (VeRA's) is a random matrix that ΔW depends on as
much as on the trained ones, so a state without it could neither reproduce nor compare the
adapter. A vector the notation leaves out is the constant 1, not a parameter, and has no key.

Rows of B and v (column-parallel bases) are in megatron's global order: the fused QKV per query
group ([q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...]), which TP
shards in contiguous blocks of whole groups; a gated (SwiGLU) fc1 as [gate; up], where each TP
rank holds [its gate block; its up block] (`LinearLayout.local_out_index`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.atomic import problems_on_every_rank
from tiedlora_megatron.experts import expert_key
from tiedlora_megatron.layouts import LinearLayout
from tiedlora_megatron.pipeline import pipeline_rank_and_group

if TYPE_CHECKING:
    from tiedlora_megatron.inject import TiedLoRAAdapters

TIED_PREFIX = "tied"
LAYER_PREFIX = "layers"


class FullStateError(ValueError):
    """A full adapter state that does not fit the adapters; the message names the keys."""


# -- one tensor: gather and slice ----------------------------------------------------------------


def gather_full(local: torch.Tensor, layout: LinearLayout, dim: int) -> torch.Tensor:
    """The global tensor of a TP shard split along `dim` (0: output rows, 1: input columns),
    in megatron's global order (a SwiGLU fc1 is [gate; up] globally, not per shard).
    Collective over the layout's TP group."""
    if layout.tp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layout.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=layout.tp_group)
    shape = list(local.shape)
    shape[dim] = layout.out_features if dim == 0 else layout.in_features
    full = local.new_empty(shape)
    for rank, part in enumerate(parts):
        lay = dataclasses.replace(layout, tp_rank=rank)
        if dim == 0:
            full[lay.local_out_index()] = part
        else:
            full[:, lay.local_in_index()] = part
    return full


def local_shard(full: torch.Tensor, layout: LinearLayout, dim: int) -> torch.Tensor:
    """This rank's shard of a global tensor split along `dim`: the inverse of `gather_full`."""
    if dim == 0:
        return full[layout.local_out_index()]
    return full[:, layout.local_in_index()]


# -- the adapters' factors under their global keys -----------------------------------------------


@dataclass
class _Entry:
    """One factor of this rank: its replicas here (a tied factor: one per local chunk) and how
    TP shards it."""

    layout: LinearLayout
    dim: int | None
    """The dimension TP splits (None: replicated)."""
    params: list[nn.Parameter] = field(default_factory=list)

    def full_shape(self) -> tuple[int, ...]:
        shape = list(self.params[0].shape)
        if self.dim is not None:
            shape[self.dim] = self.layout.out_features if self.dim == 0 else self.layout.in_features
        return tuple(shape)


def _local_entries(adapters: TiedLoRAAdapters) -> dict[str, _Entry]:
    """This rank's factors by global key, in the same order on every rank of a TP group (the
    order of its collectives)."""
    entries: dict[str, _Entry] = {}
    owner: dict[str, str] = {}
    for bank, chunk_adapters in zip(adapters.banks, adapters.adapters, strict=True):
        for factors in (bank or {}).values():
            for f in ("A", "B"):
                key = f"{TIED_PREFIX}.{expert_key(factors.kind, factors.expert)}.{f}"
                entry = entries.setdefault(key, _Entry(factors.layout, factors.layout.shard_dim(f)))
                entry.params.append(getattr(factors, f))
        for name, adapter in chunk_adapters.items():
            if adapter.layer_number is None:
                raise FullStateError(
                    f"{name}: no enclosing megatron TransformerLayer (`layer_number`), so its "
                    "per-layer factors have no global key"
                )
            params = {"u": adapter.u, "v": adapter.v}
            if bank is None:
                params.update(A=adapter.lowrank.A, B=adapter.lowrank.B)
            for f, p in params.items():
                if p is None:
                    continue
                kind = expert_key(adapter.kind, adapter.expert)
                key = f"{LAYER_PREFIX}.{adapter.layer_number - 1}.{kind}.{f}"
                if key in entries:
                    raise FullStateError(
                        f"{name} and {owner[key]} would both be {key!r}: one layer with two "
                        f"adapted {adapter.kind} modules has no unique full-state key"
                    )
                owner[key] = name
                entries[key] = _Entry(adapter.layout, adapter.layout.shard_dim(f), [p])
    return entries


def _in_global_order(items: Mapping[str, object]) -> dict:
    """Tied keys first, then layers by global index (a stable sort: kinds keep their order)."""

    def position(key: str) -> tuple[int, int]:
        parts = key.split(".")
        return (0, 0) if parts[0] == TIED_PREFIX else (1, int(parts[1]))

    return {k: items[k] for k in sorted(items, key=position)}


def _union(mine: dict, group: dist.ProcessGroup | None) -> dict:
    """The union of the group's dicts (the first rank's value wins for a key on several)."""
    if group is None:
        return mine
    ranks: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, mine, group=group)
    out: dict = {}
    for theirs in ranks:
        for key, value in theirs.items():
            out.setdefault(key, value)
    return out


def _from_every_stage(mine: dict) -> dict:
    """The union of every expert-parallel rank's and pipeline stage's dict (the first stage's
    value wins for a key on several, i.e. the primary replica of a tied factor), in global
    order."""
    from megatron.core import parallel_state as ps

    ep_group = None
    if ps.model_parallel_is_initialized() and ps.get_expert_model_parallel_world_size() > 1:
        ep_group = ps.get_expert_model_parallel_group()
    _, pp_group = pipeline_rank_and_group()
    return _in_global_order(_union(_union(mine, ep_group), pp_group))


@torch.no_grad()
def full_state_dict(adapters: TiedLoRAAdapters) -> dict[str, torch.Tensor]:
    """Every adapter factor (trained or frozen) as a full CPU tensor in its parameter's dtype,
    under the keys described in this module's doc, in global layer order.

    Collective: every rank of the model-parallel (TP x PP) group, and of the expert-parallel
    group under EP, calls it (every rank, in practice); each gets the same
    dict. Tied factors are read from the primary replica (first stage, first chunk)."""
    mine = {}
    for key, e in _local_entries(adapters).items():
        local = e.params[0].detach()
        full = local if e.dim is None else gather_full(local, e.layout, e.dim)
        mine[key] = full.to("cpu", copy=True)
    return _from_every_stage(mine)


def _problems(
    adapters: TiedLoRAAdapters,
    state: Mapping[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    strict: bool,
) -> list[str]:
    problems = []
    if any(a.merged for chunk in adapters.adapters for a in chunk.values()):
        problems.append(
            "the adapters are merged into their base weights; unmerge them first "
            "(export.unmerge_adapters subtracts the factors' ΔW)"
        )
    for key in state:
        if key not in expected:
            close = difflib.get_close_matches(key, list(expected), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
    for key, shape in expected.items():
        if key not in state:
            if strict:
                problems.append(f"missing key {key!r} (expected shape {shape})")
            continue
        value = state[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r}: expected a tensor of shape {shape}, given {type(value)}")
        elif tuple(value.shape) != shape:
            problems.append(f"{key!r}: wrong shape: expected {shape}, given {tuple(value.shape)}")
    return problems


def _raise_if_any(problems: list[str]) -> None:
    """Raise on every model-parallel rank if any of them found a problem, before any rank
    changes a parameter (ranks could be given different states)."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.model_parallel_is_initialized():
        problems = problems_on_every_rank(problems, ps.get_model_parallel_group())
    if problems:
        raise FullStateError(
            f"full adapter state does not fit the adapters ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )


@torch.no_grad()
def load_full_state_dict(
    adapters: TiedLoRAAdapters, state: Mapping[str, torch.Tensor], strict: bool = True
) -> list[str]:
    """Set every factor from full tensors keyed as `full_state_dict` returns them: each rank
    copies its own shard (cast to the parameter's dtype and device) into every replica it
    holds, so tied replicas stay identical on all stages and chunks.

    Collective over the model-parallel (TP x PP) and expert-parallel groups (every rank, in
    practice); every rank passes the whole `state`.
    Unknown keys, wrong shapes, and with `strict` missing keys, raise FullStateError on every
    rank naming each key (and the expected and given shapes) before anything is changed.
    Returns the keys that were not in `state` (only possible with `strict=False`).

    A mixed-precision or distributed optimizer built before keeps its own fp32 copies: call its
    `reload_model_params()` afterwards."""
    entries = _local_entries(adapters)
    expected = _from_every_stage({k: e.full_shape() for k, e in entries.items()})
    _raise_if_any(_problems(adapters, state, expected, strict))
    for key, e in entries.items():
        if key not in state:
            continue
        value = state[key]
        shard = value if e.dim is None else local_shard(value, e.layout, e.dim)
        for p in e.params:
            p.copy_(shard)
    return [k for k in expected if k not in state]
