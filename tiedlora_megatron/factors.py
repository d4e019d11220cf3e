"""The low-rank factors A and B of one target kind: seeded start, sharding, megatron attributes.

A tied pair is owned by exactly one module per model chunk (`TiedFactorBank`), which layers
reference without registering, so state dicts, optimizers and DDP see each tied parameter once.
An untied pair (LoRA) is owned by its layer's adapter.

Every factor is drawn in full (unsharded) on a CPU generator whose seed depends only on the
config seed, the target kind, the layer (untied) and the factor, then sliced to this rank's
shard: the same seed gives the same full factors at every parallel layout.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from torch import nn

from tiedlora_megatron.config import FactorSpec, TiedLoRAConfig
from tiedlora_megatron.experts import is_routed
from tiedlora_megatron.layouts import LinearLayout


def factor_seed(
    seed: int, kind: str, factor: str, layer_number: int | None = None, expert: int | None = None
) -> int:
    """A stable 63-bit seed for one factor (independent of process, layout and Python hash);
    `expert` is the global index of a routed expert's own factor."""
    key = f"{seed}/{kind}/{factor}/{'tied' if layer_number is None else layer_number}"
    if expert is not None:
        key += f"/expert{expert}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def init_full_matrix(
    spec: FactorSpec, shape: tuple[int, int], rank: int, seed: int
) -> torch.Tensor:
    """The full fp32 matrix for `spec`, drawn on a CPU generator seeded with `seed`.

    "kaiming_uniform" is LoRA's (and VeRA's) start: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which
    is kaiming_uniform_ with a = sqrt(5); "normal" is N(0, 1/rank^2) as PEFT's gaussian A.
    """
    out = torch.empty(shape, dtype=torch.float32)
    if spec.init == "zeros":
        return out.zero_()
    g = torch.Generator().manual_seed(seed)
    if spec.init == "kaiming_uniform":
        return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=g)
    return out.normal_(0.0, 1.0 / rank, generator=g)


def mark_sharded(param: nn.Parameter, dim: int | None) -> nn.Parameter:
    """Set megatron's tensor-parallel attributes: sharded along `dim`, or replicated (None)."""
    set_tensor_model_parallel_attributes(param, dim is not None, 0 if dim is None else dim, 1)
    return param


class LowRankFactors(nn.Module):
    """A (rank x d_in, this rank's shard) and B (d_out x rank, this rank's shard).

    Column-parallel base: A replicated, B sharded along d_out. Row-parallel base: A sharded
    along d_in, B replicated. The rank dimension is never sharded. `expert` is the global index
    of the routed expert owning the pair (None: a dense pair, or one tied across experts).
    """

    def __init__(
        self,
        config: TiedLoRAConfig,
        kind: str,
        layout: LinearLayout,
        *,
        layer_number: int | None = None,
        expert: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.kind = kind
        self.layout = layout
        self.expert = expert
        r = config.rank
        specs = {f: config.factor_spec(f) for f in ("A", "B")}
        full_a = init_full_matrix(
            specs["A"],
            (r, layout.in_features),
            r,
            factor_seed(config.seed, kind, "A", layer_number, expert),
        )
        full_b = init_full_matrix(
            specs["B"],
            (layout.out_features, r),
            r,
            factor_seed(config.seed, kind, "B", layer_number, expert),
        )
        a = full_a[:, layout.local_in_index()].contiguous()
        b = full_b[layout.local_out_index()].contiguous()
        self.A = nn.Parameter(a.to(device=device, dtype=dtype), requires_grad=specs["A"].trained)
        self.B = nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=specs["B"].trained)
        column = layout.parallel == "column"
        mark_sharded(self.A, None if column else 1)
        mark_sharded(self.B, 0 if column else None)
        # Under sequence parallel the replicated factor sees only this rank's tokens (under an
        # expert's explicit communication, a partial product), so its gradient is a partial sum
        # that megatron's finalize_model_grads completes over TP.
        if layout.partial_replicated_grads:
            (self.A if column else self.B).sequence_parallel = True

    def extra_repr(self) -> str:
        expert = "" if self.expert is None else f", expert={self.expert}"
        return (
            f"kind={self.kind}{expert}, {self.layout.parallel}-parallel, A={tuple(self.A.shape)}, "
            f"B={tuple(self.B.shape)}, trained=(A={self.A.requires_grad}, B={self.B.requires_grad})"
        )


#: Attribute under which a model chunk holds its TiedFactorBank.
BANK_ATTR = "tied_adapter"


class TiedFactorBank(nn.ModuleDict):
    """The single owner, in one model chunk, of the tied factors of every target kind (keyed by
    `experts.bank_key`: a routed-expert kind may hold one pair per expert)."""

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """megatron dist-checkpoint entries of the tied factors: TP-sharded as their base,
        stored once (replica id 0 on the primary replica, 1 on every other stage and chunk,
        which `pipeline.mark_tied_replicas` marks `shared`). A pair of one routed expert is
        replicated over that expert's data-parallel group, as its expert's weights are."""
        from megatron.core import parallel_state as ps

        replica = int(any(getattr(p, "shared", False) for p in self.parameters()))
        out = {}
        for key, factors in self.items():
            tensors = {"A": factors.A, "B": factors.B}
            groups: dict = dict(expert=is_routed(factors.kind))
            if factors.expert is not None:
                groups.update(
                    tp_group=factors.layout.tp_group,
                    dp_group=ps.get_expert_data_parallel_group(),
                )
            out.update(
                sharded_factor_entries(
                    tensors, factors.layout, f"{prefix}{key}.", sharded_offsets, **groups
                )
            )
        for entry in out.values():
            entry.replica_id = (replica, *tuple(entry.replica_id)[1:])
        return out


def sharded_factor_entries(
    tensors: dict[str, torch.Tensor],
    layout: LinearLayout,
    prefix: str,
    sharded_offsets: tuple,
    *,
    tp_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    expert: bool = False,
) -> dict:
    """ShardedTensors (or megatron's SwiGLU factories) for adapter tensors named "A", "B", "u",
    "v" (optionally under a module prefix such as "factors."), sharded as `layout` shards them.
    The groups set the replica id (default: megatron's dense tensor- and data-parallel ones);
    give both or neither. A routed expert's factors (`expert`) are sharded over expert tensor
    parallelism (experts.py): stored whole at ETP 1, whatever the dense TP size."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    dims = {name: layout.shard_dim(name.rsplit(".", 1)[-1]) for name in tensors}
    sharded = not expert or layout.tp_size > 1
    axis = {name: dim for name, dim in dims.items() if dim is not None and sharded}
    entries = make_sharded_tensors_for_checkpoint(
        dict(tensors), prefix, axis, sharded_offsets, tp_group=tp_group, dp_cp_group=dp_group
    )
    if layout.gated:  # at every TP, so that checkpoints reshard
        for name in axis:
            key = prefix + name
            entries[key] = apply_swiglu_sharded_factory(entries[key], sharded_offsets)
    return entries
