"""The per-layer adapter: u_l, v_l and the forward with rank-r communication only.

`TiedLoRAAdapter` adds `s · diag(v) · B · diag(u) · A x` to its base layer's output. It runs as a
forward hook on the base layer, so the base keeps its module path, parameter names and state
dict keys (a base checkpoint loads unchanged into an adapted model), and registers itself as the
base's sibling `<name>_adapter` so that megatron-core's own (sharded) state dict recursion visits
it with the layer's offsets.

Speed: u and v never scale activations. They are folded into the factors once per forward
(`A_eff = u[:, None] * A` on the side whose gradient is exact on every rank, `B_eff = s * v[:, None]
* B`), which costs r x d element-wise work, and the adapter is then LoRA's two GEMMs.

Communication (T tokens, r the rank), following design.md:
- column-parallel base: z = A_eff x is exact locally; `copy_to_tensor_model_parallel_region(z)`
  all-reduces dz (T x r) in backward. Under sequence parallel z is computed on the local tokens
  and all-gathered (backward: reduce-scatter), and A, u are marked `sequence_parallel`.
- row-parallel base: h = all_reduce(A_local x_local) (T x r), then y = B_eff h with u folded into
  B, all replicated. Under sequence parallel h is reduce-scattered along the sequence instead
  and B, u, v are marked `sequence_parallel`.
- a base whose caller communicates (routed experts under expert TP > 1, `explicit_comm`):
  no collective; the adapter's output (row) and input gradient (column) are partial like the
  base's, and the replicated factors are marked `sequence_parallel` (experts.py).

Transformer Engine bases follow the same paths. For `TELayerNormColumnParallelLinear` the
adapter's input is the layer's normalised input: while attached, the adapter sets the layer's
`return_layernorm_output` and hands the caller the layer's usual (output, bias). Under sequence
parallel it takes the norm output on the local tokens, not TE's gathered copy
(`return_layernorm_output_gathered`), and gathers only the rank-r z as for a local column base:
the gathered copy would make every rank run A over all T tokens, and TE adds that copy's
gradient before its own reduce-scatter, i.e. expects it partial, which the local path is not.

Precision: the adapter's matmuls are plain torch ops in the activation dtype (bf16 in mixed
precision). TE's `fp8_autocast` changes only TE modules and the adapter uses none, so under FP8
the base layer runs in FP8 while the adapter, and the normalised input TE returns to it (TE
keeps that in the activation dtype), stay in bf16.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings
from torch import nn
from torch.utils.hooks import RemovableHandle

from tiedlora_megatron.config import TiedLoRAConfig
from tiedlora_megatron.factors import LowRankFactors, mark_sharded, sharded_factor_entries
from tiedlora_megatron.layouts import LinearLayout, UnsupportedLayerError, split_output


class TiedLoRAAdapter(nn.Module):
    """The adapter of one base linear layer (one layer, one target kind)."""

    def __init__(
        self,
        config: TiedLoRAConfig,
        kind: str,
        name: str,
        layout: LinearLayout,
        factors: LowRankFactors,
        *,
        owns_factors: bool,
        layer_number: int | None,
        expert: int | None = None,
    ):
        super().__init__()
        self.kind = kind
        self.base_name = name
        self.layout = layout
        self.layer_number = layer_number
        self.expert = expert
        """Global index of the routed expert whose layer this is (None: a dense layer)."""
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if owns_factors:
            self.factors = factors
        else:
            # A reference, not a child: the chunk's TiedFactorBank owns the tied pair.
            object.__setattr__(self, "_tied_factors", factors)
        ref = factors.A
        column = layout.parallel == "column"
        self.u = self._vector(config, "u", config.rank, None, ref)
        self.v = self._vector(config, "v", layout.local_out, 0 if column else None, ref)
        if layout.partial_replicated_grads:
            partial = [self.u] if column else [self.u, self.v]
            for p in partial:
                if p is not None:
                    p.sequence_parallel = True
        self._hook: tuple[nn.Module, RemovableHandle] | None = None
        # True while the update is folded into the base weight (export.merge_adapters).
        self.merged = False

    @staticmethod
    def _vector(
        config: TiedLoRAConfig, factor: str, size: int, shard_dim: int | None, ref: torch.Tensor
    ) -> nn.Parameter | None:
        if not config.uses(factor):
            return None
        spec = config.factor_spec(factor)
        p = nn.Parameter(torch.full((size,), float(spec.init), dtype=ref.dtype, device=ref.device))
        return mark_sharded(p, shard_dim)

    @property
    def lowrank(self) -> LowRankFactors:
        """The A, B this layer uses (its own, or the chunk's tied pair)."""
        return self.factors if "factors" in self._modules else self._tied_factors

    # -- the update ------------------------------------------------------------------------

    def effective_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B_eff) with s, u and v folded in: ΔW_local = B_eff @ A_eff.

        u goes to whichever of A, B is replicated (A for a column base, B for a row base), so
        that its gradient is exact on every rank; v always goes to B, sharded like it.
        """
        a = self.lowrank.A.to(dtype)
        b = self.lowrank.B.to(dtype) * self.scaling
        if self.v is not None:
            b = b * self.v.to(dtype)[:, None]
        if self.u is not None:
            if self.layout.parallel == "column":
                a = a * self.u.to(dtype)[:, None]
            else:
                b = b * self.u.to(dtype)[None, :]
        return a, b

    def delta(self, x: torch.Tensor, gather_output: bool | None = None) -> torch.Tensor:
        """The adapter's output for base input `x`, laid out like the base's output
        (`gather_output` overrides a column base's setting, as its forward's
        `runtime_gather_output` does)."""
        lay = self.layout
        gather = lay.gather_output if gather_output is None else gather_output
        a_eff, b_eff = self.effective_factors(x.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        group = lay.tp_group
        if lay.parallel == "column":
            z = F.linear(x, a_eff)
            if lay.communicates:
                if lay.sequence_parallel:
                    z = mappings.gather_from_sequence_parallel_region(
                        z, tensor_parallel_output_grad=True, group=group
                    )
                else:
                    z = mappings.copy_to_tensor_model_parallel_region(z, group=group)
            y = F.linear(z, b_eff)
            if gather and lay.tp_size > 1:
                y = mappings.gather_from_tensor_model_parallel_region(y, group=group)
            return y
        if not lay.input_is_parallel and lay.communicates:
            x = mappings.scatter_to_tensor_model_parallel_region(x, group=group)
        h = F.linear(x, a_eff)
        if lay.communicates:
            if lay.sequence_parallel:
                h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=group)
            else:
                h = mappings.reduce_from_tensor_model_parallel_region(h, group=group)
        return F.linear(h, b_eff)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """megatron dist-checkpoint entries: u, v (and untied A, B) stacked over layers with the
        offsets the enclosing TransformerLayer passes, TP-sharded as the base layer. A routed
        expert's are also stacked over experts (SequentialMLP's offsets) and replicated over the
        expert's tensor-parallel group, as its weights are."""
        tensors = {
            n: p for n, p in self.named_parameters() if "." not in n or n.startswith("factors.")
        }
        groups = {}
        if self.expert is not None:
            from megatron.core import parallel_state as ps

            # SequentialMLP replaces the data-parallel part with its expert-data-parallel rank.
            groups = dict(
                tp_group=self.layout.tp_group,
                dp_group=ps.get_data_parallel_group(with_context_parallel=True),
                expert=True,
            )
        return sharded_factor_entries(tensors, self.layout, prefix, sharded_offsets, **groups)

    # -- attachment to the base layer ------------------------------------------------------

    def attach(self, base: nn.Module) -> None:
        """Run after every forward of `base`, adding the update to its output (and make a
        norm-fused base return its normalised input, the adapter's input, until `detach`)."""
        if self._hook is not None:
            raise RuntimeError(f"{self.base_name}: adapter is already attached")
        handle = base.register_forward_hook(self._after_base, with_kwargs=True)
        if self.layout.normalizes_input:
            base.return_layernorm_output = True
        # A tuple, so that the base is not registered as a child of its adapter.
        self._hook = (base, handle)

    def detach(self) -> None:
        """Stop adding the update (the parameters stay); the base returns its usual forms."""
        if self._hook is not None:
            base, handle = self._hook
            handle.remove()
            if self.layout.normalizes_input:
                base.return_layernorm_output = False
            self._hook = None

    def _after_base(
        self,
        base: nn.Module,
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        output: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        if args is None:
            # megatron's TEFusedMLP (use_te_op_fuser) runs TE ops on the layers' weights and
            # calls their forward hooks with no input or output: the update cannot be added.
            raise UnsupportedLayerError(
                f"{self.base_name}: its module ran it without calling its forward (megatron's "
                "TEFusedMLP, use_te_op_fuser=True); adapters need the layer's own forward"
            )
        x = args[0] if args else kwargs["input_"]
        gather = args[2] if len(args) > 2 else kwargs.get("runtime_gather_output")
        out, bias, normed = split_output(output, self.base_name, self.layout.normalizes_input)
        return out + self.delta(x if normed is None else normed, gather), bias

    def extra_repr(self) -> str:
        tied = "own A, B" if "factors" in self._modules else "tied A, B"
        expert = "" if self.expert is None else f", expert={self.expert}"
        return f"{self.base_name}, {tied}, s={self.scaling:g}, layer={self.layer_number}{expert}"
