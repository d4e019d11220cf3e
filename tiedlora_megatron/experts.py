"""Adapters inside megatron-core's mixture-of-experts layers: target kinds, expert indices, and
how the expert factors' gradients are reduced.

Target kinds. A linear layer's kind is its attribute name, qualified by the MoE part holding it:
`experts.linear_fc1` for a routed expert's (`mlp.experts.local_experts.<i>.linear_fc1` of a
`SequentialMLP`), `shared_experts.linear_fc1` for the shared expert's, plain `linear_fc1` for a
dense MLP's. The shared expert is an ordinary tensor-parallel MLP, so its adapters are dense
ones; only routed experts need what follows.

Routed experts (expert parallelism EP, expert tensor parallelism ETP). Local expert i of EP rank
p is global expert `p * num_local_experts + i`; the adapter takes that global index, so seeds,
full-state keys and checkpoints do not depend on EP. The dispatcher brings each expert exactly
the tokens routed to it. At ETP = 1 an expert's linear layers are not sharded and the adapter's
forward needs no communication. What differs from a dense layer is which ranks hold replicas of
a factor and so must sum its gradient:
- per-expert factors (u, v; A, B of per-expert LoRA or of a pair per expert index) live with
  their expert. Its replicas are the ranks holding that expert (megatron's expert-data-parallel
  group), each seeing other tokens: they are marked `allreduce = False`, which makes megatron's
  DDP reduce them over that group (with the expert gradient scaling), as it does for expert
  weights under EP. That is right at EP = 1 as well, where the expert-data-parallel group also
  spans the tensor-parallel ranks' sequence shards.
- a pair tied across experts is used by every expert of every rank: its gradient is the sum
  over all ranks of a pipeline stage. megatron's DDP sums dense parameters over the
  data-parallel group; under tensor (and so sequence) parallelism the factor is also marked
  `sequence_parallel`, which makes `finalize_model_grads` sum it over the tensor-parallel group,
  as it does for the router and the norms. Each contribution is summed exactly once. It is
  whole on every rank, so it is not marked `tensor_model_parallel` (the norm for clipping
  counts it once), while per-expert factors are marked `tensor_model_parallel` like the expert
  weights, so the norm counts them on every rank holding their expert.

Expert tensor parallelism ETP = TP (megatron's default) shards an expert's fc1 by output and fc2
by input over the TP group, and the dispatcher does the layers' communication: it gathers the
tokens over the group before fc1 (which then leaves its input gradient partial) and
reduce-scatters fc2's partial output. The adapter follows with no collective of its own
(`LinearLayout.explicit_comm`): fc1's B, v and fc2's A are sharded like the weights, and the
replicated factors (fc1's A, u; fc2's B, u, v) hold partial gradients, marked
`sequence_parallel` so that `finalize_model_grads` sums them over the TP group, which must then
be the expert TP group (other ETP sizes are refused). A tied-across-experts pair is then laid
out as a dense layer's pair: DDP sums it over the data-parallel ranks holding the same shard.
For gradient clipping, sharded factors are `tensor_model_parallel` and replicated ones are
counted on the first TP rank, as the expert weights and the router are.

Grouped-GEMM experts (`GroupedMLP`, `TEGroupedMLP`) run every expert in one GEMM with no
per-expert module to attach to: refused, naming `moe_grouped_gemm=False` (SequentialMLP).
"""

from __future__ import annotations

import re

from torch import nn

from tiedlora_megatron.layouts import LinearLayout, UnsupportedLayerError

#: Attribute names of the MoE parts whose linear layers get a qualified kind.
ROUTED, SHARED = "experts", "shared_experts"

_LOCAL_EXPERT = re.compile(r"(?:^|\.)local_experts\.(\d+)\.")
_BANK_KEY = re.compile(rf"^({SHARED}|{ROUTED})(?:_(\d+))?_(\w+)$")


def target_kind(name: str) -> str:
    """The target kind of the linear layer at module path `name` (see the module doc)."""
    parts = name.split(".")
    if SHARED in parts[:-1]:
        return f"{SHARED}.{parts[-1]}"
    if ROUTED in parts[:-1]:
        return f"{ROUTED}.{parts[-1]}"
    return parts[-1]


def is_routed(kind: str) -> bool:
    return kind.startswith(ROUTED + ".")


def expert_index(chunk: nn.Module, name: str) -> int | None:
    """The global index of the routed expert holding module path `name` (None outside one)."""
    match = _LOCAL_EXPERT.search(name)
    if match is None:
        return None
    prefix = name[: match.start()]
    experts = chunk.get_submodule(prefix) if prefix else chunk
    return experts.ep_group.rank() * experts.num_local_experts + int(match.group(1))


def check_experts_module(name: str, module: nn.Module) -> None:
    """Refuse routed experts that the adapter cannot reach one expert at a time."""
    if name.rsplit(".", 1)[-1] == ROUTED and not hasattr(module, "local_experts"):
        raise UnsupportedLayerError(
            f"{name}: {type(module).__name__} runs all of its experts in one grouped GEMM, with "
            "no per-expert layer to adapt; build the MoE layers with moe_grouped_gemm=False "
            "(megatron-core's SequentialMLP) to adapt experts.* targets"
        )


def mark_per_expert(params: list[nn.Parameter | None], layout: LinearLayout) -> None:
    """Mark per-expert factors as megatron marks its expert weights: reduced by DDP over the
    expert-data-parallel group. At expert TP 1 every one is also `tensor_model_parallel`, so
    that gradient-norm clipping counts each on every rank holding an expert, as it counts the
    expert weights; beyond, the TP attributes stay those of the layout (a replicated factor is
    counted on one expert-TP rank)."""
    for p in params:
        if p is not None:
            p.allreduce = False
            if layout.tp_size == 1:
                p.tensor_model_parallel = True


def mark_tied_across_experts(params: list[nn.Parameter], layout: LinearLayout, config) -> None:
    """Make `finalize_model_grads` complete a factor shared by all experts over the
    tensor-parallel group (its data-parallel sum is DDP's). At expert TP 1 it is whole on every
    rank, not a TP shard: gradient-norm clipping must count it on one tensor-parallel rank
    only. At expert TP = TP the layout has marked it already, as a dense layer's factor."""
    from megatron.core import parallel_state as ps

    if layout.tp_size > 1:
        return
    for p in params:
        p.tensor_model_parallel = False

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if tp == 1:
        return
    if not config.sequence_parallel:
        raise UnsupportedLayerError(
            "experts.* targets at tensor_model_parallel_size > 1 need sequence_parallel=True "
            "(megatron-core trains MoE layers under tensor parallelism only with it)"
        )
    for p in params:
        p.sequence_parallel = True


def bank_key(kind: str, expert: int | None) -> str:
    """The key of a tied pair in a chunk's `TiedFactorBank` (module names cannot hold dots):
    `linear_qkv`, `experts_linear_fc1` (shared by all experts), `experts_3_linear_fc1` (the
    pair of expert 3)."""
    if expert is None:
        return kind.replace(".", "_")
    part, attr = kind.split(".")
    return f"{part}_{expert}_{attr}"


def parse_bank_key(key: str) -> tuple[str, int | None]:
    """(kind, expert) of a `bank_key`."""
    match = _BANK_KEY.match(key)
    if match is None:
        return key, None
    part, expert, attr = match.groups()
    return f"{part}.{attr}", None if expert is None else int(expert)


def expert_key(kind: str, expert: int | None) -> str:
    """The kind with its expert index, as full-state keys name it: `experts.3.linear_fc1`."""
    if expert is None:
        return kind
    part, attr = kind.split(".")
    return f"{part}.{expert}.{attr}"
