"""How a base linear layer is sharded over tensor-parallel ranks, and what it returns.

The adapter follows its base layer's layout, never its own: a column-parallel base shards the
output features, a row-parallel base the input features. `describe_linear` reads that layout
off a megatron-core layer once, at injection; the adapter's forward then only consults the
resulting `LinearLayout`.

megatron-core's Transformer Engine layers have the same layouts as its local ones (TE's
column/row `parallel_mode`), so the adapter treats both alike. The one difference is the
norm-fused `TELayerNormColumnParallelLinear`, whose GEMM input is its own normalised input:
the adapter must see that activation too, so the layer is asked to return it
(`normalizes_input`) and `split_output` takes it back out of the return value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.te import (
    NORM_FUSED_TE_LAYER,
    SUPPORTED_TE_LAYERS,
    UNSUPPORTED_TE_LAYERS,
    require_te,
    te_layer_name,
)

Parallelism = Literal["column", "row"]


class UnsupportedLayerError(TypeError):
    """A target module whose type or settings the adapter cannot follow exactly."""


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
    normalizes_input: bool = False
    """The base normalises its input before its GEMM (TELayerNormColumnParallelLinear): the
    adapter's input is that normalised activation, which the base returns when asked
    (`return_layernorm_output`), on the same tokens as the base's input."""
    explicit_comm: bool = False
    """The base's caller does its tensor-parallel communication (a routed expert's layer under
    expert tensor parallelism > 1, megatron's `explicit_expert_comm`: the token dispatcher
    gathers the tokens and reduce-scatters the output). A column base gets its input whole on
    every rank and leaves the input gradient partial; a row base leaves its output partial.
    The adapter adds no collective and leaves the same partial sums (experts.py)."""

    @property
    def communicates(self) -> bool:
        """Whether the adapter's forward runs the rank-r collectives of its layout."""
        return self.tp_size > 1 and not self.explicit_comm

    @property
    def partial_replicated_grads(self) -> bool:
        """The gradients of the factors this layout replicates (a column base's A and u, a row
        base's B, u and v) are partial sums over the TP group: under sequence parallelism each
        rank sees its own tokens; under explicit communication each holds a partial product.
        They are marked `sequence_parallel`, which makes megatron's `finalize_model_grads` sum
        them over the tensor-parallel group."""
        return self.sequence_parallel or self.explicit_comm

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

    def shard_dim(self, factor: str) -> int | None:
        """The dimension along which TP splits adapter factor `factor` ("A", "B", "u" or "v"),
        following the base: a column base's B and v along d_out (0), a row base's A along d_in
        (1); None where the factor is replicated."""
        if self.parallel == "column":
            return 0 if factor in ("B", "v") else None
        return 1 if factor == "A" else None

    def local_in_index(self) -> slice:
        """Columns of a full d_in-sized tensor (A) that this rank holds."""
        if self.parallel == "column":
            return slice(None)
        n = self.local_in
        return slice(self.tp_rank * n, (self.tp_rank + 1) * n)


def describe_linear(module: nn.Module, name: str) -> LinearLayout:
    """The layout of megatron-core linear layer `module` (at module path `name`).

    Reads megatron's local layers (ColumnParallelLinear, RowParallelLinear) and its Transformer
    Engine wrappers (TELayerNormColumnParallelLinear, TEColumnParallelLinear, TERowParallelLinear;
    TE >= te.MIN_TE_VERSION). Raises UnsupportedLayerError, naming the module, for layers the
    adapter cannot follow exactly: expert layers whose expert tensor-parallel group is not the
    dense one, TE expert and grouped layers, other layers that skip their input-gradient
    reduction, TE layers that are not column or row parallel, and TE layers already asked to
    return their norm's output.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    te_name = te_layer_name(module)
    if te_name is not None:
        parallel, layout = _read_te_linear(module, name, te_name)
    elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        parallel, layout = _read_local_linear(module, name)
    else:
        raise UnsupportedLayerError(
            f"{name}: cannot adapt a {type(module).__module__}.{type(module).__name__}; "
            "supported are megatron-core's ColumnParallelLinear, RowParallelLinear and their "
            "Transformer Engine counterparts"
        )
    group = layout.pop("tp_group")
    tp_size, tp_rank = _tp_size_rank(group)
    # A TE layer also keeps its own TP size (the one it communicates with): it must agree.
    if layout.pop("tp_size", tp_size) != tp_size:
        raise UnsupportedLayerError(
            f"{name}: the layer's tensor-parallel size does not match its process group's "
            f"({tp_size})"
        )
    gated = (
        parallel == "column"
        and name.rsplit(".", 1)[-1] == "linear_fc1"
        and bool(getattr(module.config, "gated_linear_unit", False))
    )
    out = LinearLayout(
        parallel,
        tp_size=tp_size,
        tp_rank=tp_rank,
        tp_group=group,
        sequence_parallel=bool(module.sequence_parallel)
        and tp_size > 1
        and not layout.get("explicit_comm", False),
        gated=gated,
        **layout,
    )
    weight = module.weight
    expected = (out.local_out, out.local_in)
    if weight is None or tuple(weight.shape) != expected:
        raise UnsupportedLayerError(
            f"{name}: weight shape {None if weight is None else tuple(weight.shape)} does not "
            f"match the {parallel}-parallel layout {expected} at TP={tp_size}"
        )
    return out


def _tp_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _read_local_linear(module: nn.Module, name: str) -> tuple[Parallelism, dict[str, Any]]:
    """(parallelism, LinearLayout fields) of a megatron-core ColumnParallelLinear or
    RowParallelLinear."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    fields: dict[str, Any] = dict(
        in_features=module.input_size, out_features=module.output_size, tp_group=module.tp_group
    )
    if getattr(module, "is_expert", False):
        # A routed expert's layer (experts.py): at expert TP 1 an unsharded linear; beyond it
        # the token dispatcher does the layer's communication.
        fields["explicit_comm"] = _check_expert_tp(module, name)
    elif getattr(module, "disable_grad_reduce", False):
        raise UnsupportedLayerError(
            f"{name}: layers built with disable_grad_reduce=True are not supported (their "
            "input gradient is left partial, which the adapter's exact gradient would break)"
        )
    if isinstance(module, ColumnParallelLinear):
        return "column", dict(fields, gather_output=bool(module.gather_output))
    return "row", dict(fields, input_is_parallel=bool(module.input_is_parallel))


def _check_expert_tp(module: nn.Module, name: str) -> bool:
    """Whether a routed expert's layer is tensor-parallel (expert TP > 1); refuses an expert TP
    group other than the dense one, over which finalize_model_grads sums the partial gradients
    of the replicated factors (`LinearLayout.partial_replicated_grads`)."""
    size, _ = _tp_size_rank(module.tp_group)
    if size == 1:
        return False
    from megatron.core import parallel_state as ps

    dense = ps.get_tensor_model_parallel_group()
    if dist.get_process_group_ranks(module.tp_group) != dist.get_process_group_ranks(dense):
        raise UnsupportedLayerError(
            f"{name}: expert layers are supported at expert_tensor_parallel_size=1 or equal to "
            f"tensor_model_parallel_size ({dense.size()}), not {size}: the adapter sums its "
            "expert factors' partial gradients over the tensor-parallel group"
        )
    if not module.config.sequence_parallel:
        raise UnsupportedLayerError(
            f"{name}: expert tensor parallelism needs sequence_parallel=True (megatron-core "
            "trains MoE layers under tensor parallelism only with it)"
        )
    return True


def _read_te_linear(
    module: nn.Module, name: str, te_name: str
) -> tuple[Parallelism, dict[str, Any]]:
    """(parallelism, LinearLayout fields) of one of megatron-core's TE linear wrappers."""
    if te_name in UNSUPPORTED_TE_LAYERS:
        raise UnsupportedLayerError(f"{name}: {te_name}: {UNSUPPORTED_TE_LAYERS[te_name]}")
    require_te()
    parallel, fields = te_layout_fields(
        te_name,
        name,
        parallel_mode=module.parallel_mode,
        in_features=module.in_features,
        out_features=module.out_features,
        tp_size=module.tp_size,
        returns_norm_output=bool(
            getattr(module, "return_layernorm_output", False)
            or getattr(module, "return_layernorm_output_gathered", False)
        ),
    )
    return parallel, dict(fields, tp_group=module.tp_group)


def te_layout_fields(
    te_name: str,
    name: str,
    *,
    parallel_mode: str | None,
    in_features: int,
    out_features: int,
    tp_size: int,
    returns_norm_output: bool = False,
) -> tuple[Parallelism, dict[str, Any]]:
    """(parallelism, LinearLayout fields but the group) of the supported TE wrapper `te_name`
    at module path `name`, from the attributes TE keeps on the layer.

    TE keeps the global input size of a column layer and the global output size of a row layer;
    the other is this rank's shard.
    """
    if te_name not in SUPPORTED_TE_LAYERS:
        raise UnsupportedLayerError(
            f"{name}: {te_name}: {UNSUPPORTED_TE_LAYERS.get(te_name, 'not a TE linear wrapper')}"
        )
    parallel = SUPPORTED_TE_LAYERS[te_name]
    if parallel_mode != parallel:
        # megatron builds expert layers under TP or EP with parallel_mode=None (it communicates
        # for them itself); anything but the wrapper's own mode is a layout the adapter can't read.
        raise UnsupportedLayerError(
            f"{name}: {te_name} with parallel_mode={parallel_mode!r} is not supported "
            f"(expected {parallel!r}; expert layers are not supported)"
        )
    if ".experts." in f".{name}.":
        raise UnsupportedLayerError(f"{name}: {te_name}: expert (MoE) layers are not supported")
    normalizes_input = te_name == NORM_FUSED_TE_LAYER
    if normalizes_input and returns_norm_output:
        raise UnsupportedLayerError(
            f"{name}: {te_name} already returns its norm's output (return_layernorm_output); "
            "the adapter needs the layer's plain (output, bias) return form to start from"
        )
    tp_size = int(tp_size)
    column = parallel == "column"
    return parallel, dict(
        in_features=in_features * (1 if column else tp_size),
        out_features=out_features * (tp_size if column else 1),
        tp_size=tp_size,
        normalizes_input=normalizes_input,
    )


def split_output(
    output: Any, name: str, normalizes_input: bool = False
) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """(output, bias, normalised input or None) of a base layer's return value.

    Every megatron-core linear layer returns (output, bias-or-None). A norm-fused TE layer asked
    for its norm's output (`normalizes_input`) returns, through megatron's wrapper, either
    ((output, norm_output), None) - TE's (output, norm_output) wrapped with megatron's None
    bias - or, when it returns its bias (`te_return_bias`), TE's (output, bias, norm_output)
    unchanged.
    """
    if isinstance(output, tuple):
        if not normalizes_input and len(output) == 2 and isinstance(output[0], torch.Tensor):
            return output[0], output[1], None
        if normalizes_input and len(output) == 3 and _tensors(output[0], output[2]):
            return output[0], output[1], output[2]
        if (
            normalizes_input
            and len(output) == 2
            and output[1] is None
            and isinstance(output[0], tuple)
            and len(output[0]) == 2
            and _tensors(*output[0])
        ):
            return output[0][0], None, output[0][1]
    expected = (
        "((output, norm_output), None) or (output, bias, norm_output)"
        if normalizes_input
        else "(output, bias)"
    )
    raise UnsupportedLayerError(
        f"{name}: expected the layer to return {expected}, got {type(output).__name__}"
        + (f" of length {len(output)}" if isinstance(output, tuple) else "")
    )


def _tensors(*values: Any) -> bool:
    return all(isinstance(v, torch.Tensor) for v in values)
