"""How a base linear layer is sharded over tensor-parallel ranks, and what it returns.

The adapter follows its base layer's layout, never its own: a column-parallel base shards the
output features, a row-parallel base the input features. `describe_linear` reads that layout
off a megatron-core layer once, at injection; the adapter's forward then only consults the
resulting `LinearLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

Parallelism = Literal["column", "row"]


class UnsupportedLayerError(TypeError):
    """A target module whose type or settings the adapter cannot follow exactly."""


# Transformer Engine layers, recognised by their megatron-core wrapper class's qualified name so
# that no TE import is needed to tell them apart; their forward path lands with TE support.
_TE_MODULE = "megatron.core.extensions.transformer_engine"
_TE_LAYERS = (
    "TELayerNormColumnParallelLinear",
    "TEColumnParallelLinear",
    "TERowParallelLinear",
    "TEGroupedLinear",
    "TEColumnParallelGroupedLinear",
    "TERowParallelGroupedLinear",
)


@dataclass(frozen=True)
class LinearLayout:
    """The sharding of one base linear layer, as the adapter must follow it."""

    parallel: Parallelism
    in_features: int
    """Global (unsharded) input features d_in."""
    out_features: int
    """Global (unsharded) output features d_out."""
    tp_size: int
    tp_rank: int
    tp_group: dist.ProcessGroup | None
    sequence_parallel: bool
    """Column: the input arrives split along the sequence. Row: the output leaves split."""
    gather_output: bool = False
    """Column base that all-gathers its output (the adapter's output must be gathered too)."""
    input_is_parallel: bool = True
    """Row base whose input is already split along features (False: the base splits it)."""
    gated: bool = False
    """Column fc1 of a gated MLP (SwiGLU): each rank holds [gate shard; up shard], so the
    global rows it owns are two blocks, not one."""

    @property
    def local_in(self) -> int:
        return self.in_features // self.tp_size if self.parallel == "row" else self.in_features

    @property
    def local_out(self) -> int:
        return self.out_features // self.tp_size if self.parallel == "column" else self.out_features

    def local_out_index(self) -> torch.Tensor | slice:
        """Rows of a full d_out-sized tensor (B, v) that this rank holds, in local order."""
        if self.parallel == "row":
            return slice(None)
        if not self.gated:
            n = self.local_out
            return slice(self.tp_rank * n, (self.tp_rank + 1) * n)
        half, n = self.out_features // 2, self.local_out // 2
        start = self.tp_rank * n
        return torch.cat(
            [torch.arange(start, start + n), torch.arange(half + start, half + start + n)]
        )

    def local_in_index(self) -> slice:
        """Columns of a full d_in-sized tensor (A) that this rank holds."""
        if self.parallel == "column":
            return slice(None)
        n = self.local_in
        return slice(self.tp_rank * n, (self.tp_rank + 1) * n)


def _qualified_names(module: nn.Module) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}


def is_transformer_engine_layer(module: nn.Module) -> bool:
    """Whether `module` is (a subclass of) one of megatron-core's TE linear wrappers."""
    names = _qualified_names(module)
    return any(f"{_TE_MODULE}.{n}" in names for n in _TE_LAYERS)


def describe_linear(module: nn.Module, name: str) -> LinearLayout:
    """The layout of megatron-core linear layer `module` (at module path `name`).

    Raises UnsupportedLayerError, naming the module, for layers the adapter cannot follow
    exactly: expert (MoE) layers, layers that skip their input-gradient reduction, and
    Transformer Engine layers (not supported by this version).
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if is_transformer_engine_layer(module):
        raise UnsupportedLayerError(
            f"{name}: {type(module).__name__} is a Transformer Engine layer; this version of "
            "tiedlora_megatron adapts megatron-core's local layers (ColumnParallelLinear, "
            "RowParallelLinear) only: build the model with the local spec"
        )
    if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        raise UnsupportedLayerError(
            f"{name}: cannot adapt a {type(module).__module__}.{type(module).__name__}; "
            "supported are megatron-core's ColumnParallelLinear and RowParallelLinear"
        )
    if getattr(module, "is_expert", False):
        raise UnsupportedLayerError(f"{name}: expert (MoE) layers are not supported")
    if getattr(module, "disable_grad_reduce", False):
        raise UnsupportedLayerError(
            f"{name}: layers built with disable_grad_reduce=True are not supported (their "
            "input gradient is left partial, which the adapter's exact gradient would break)"
        )
    group = module.tp_group
    tp_size = dist.get_world_size(group) if dist.is_initialized() else 1
    tp_rank = dist.get_rank(group) if dist.is_initialized() else 0
    common: dict[str, Any] = dict(
        in_features=module.input_size,
        out_features=module.output_size,
        tp_size=tp_size,
        tp_rank=tp_rank,
        tp_group=group,
        sequence_parallel=bool(module.sequence_parallel) and tp_size > 1,
    )
    if isinstance(module, ColumnParallelLinear):
        gated = name.rsplit(".", 1)[-1] == "linear_fc1" and bool(
            getattr(module.config, "gated_linear_unit", False)
        )
        layout = LinearLayout(
            "column", gather_output=bool(module.gather_output), gated=gated, **common
        )
    else:
        layout = LinearLayout("row", input_is_parallel=bool(module.input_is_parallel), **common)
    weight = module.weight
    expected = (layout.local_out, layout.local_in)
    if weight is None or tuple(weight.shape) != expected:
        raise UnsupportedLayerError(
            f"{name}: weight shape {None if weight is None else tuple(weight.shape)} does not "
            f"match the {layout.parallel}-parallel layout {expected} at TP={tp_size}"
        )
    return layout


def split_output(output: Any, name: str) -> tuple[torch.Tensor, Any]:
    """(output, bias) of a megatron-core linear layer's return value."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], torch.Tensor):
        return output[0], output[1]
    raise UnsupportedLayerError(
        f"{name}: expected the layer to return (output, bias), got {type(output).__name__}"
        + (f" of length {len(output)}" if isinstance(output, tuple) else "")
    )
