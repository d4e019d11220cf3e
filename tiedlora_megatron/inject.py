"""`apply_tied_lora`: find the target layers of a megatron-core model, freeze it, add adapters.

Targets are matched by module name (`linear_qkv`, ...) and checked by type, never by model
class, so any megatron-core model built from its tensor-parallel layers works (GPTModel, hybrid
models, a bare TransformerBlock). Apply adapters before wrapping the model in DDP or
Float16Module: DDP allocates gradient buffers for the parameters that are trainable when it is
built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron import experts
from tiedlora_megatron.adapter import TiedLoRAAdapter
from tiedlora_megatron.config import ConfigError, TiedLoRAConfig
from tiedlora_megatron.factors import BANK_ATTR, LowRankFactors, TiedFactorBank
from tiedlora_megatron.layouts import UnsupportedLayerError, describe_linear
from tiedlora_megatron.pipeline import (
    mark_tied_replicas,
    pipeline_rank_and_group,
    track_replicas,
)
from tiedlora_megatron.te import is_fused_te_mlp, te_layer_name

#: Suffix of the attribute under which a layer's parent holds the layer's adapter.
ADAPTER_SUFFIX = "_adapter"


@dataclass
class _Target:
    chunk: int
    name: str
    kind: str
    module: nn.Module
    parent: nn.Module
    expert: int | None
    """Global index of the routed expert holding the layer (None: not a routed expert's)."""


class TiedLoRAAdapters:
    """What `apply_tied_lora` added to a model: its adapters, tied banks and config."""

    def __init__(
        self,
        config: TiedLoRAConfig,
        chunks: list[nn.Module],
        adapters: list[dict[str, TiedLoRAAdapter]],
        banks: list[TiedFactorBank | None],
    ):
        self.config = config
        self.chunks = chunks
        self.adapters = adapters
        """Per chunk: base module path -> its adapter."""
        self.banks = banks
        """Per chunk: the bank owning the tied factors (None when untied)."""

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every adapter parameter (trained or frozen) once, named by chunk and module path."""
        for ci, chunk in enumerate(self.chunks):
            prefix = f"chunk{ci}." if len(self.chunks) > 1 else ""
            for name, p in chunk.named_parameters():
                if is_adapter_param(name):
                    yield prefix + name, p

    def parameters(self, trainable_only: bool = True) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            if p.requires_grad or not trainable_only:
                yield p

    def num_trainable_parameters(self) -> int:
        """Trainable adapter parameters of the whole model, as if unsharded and unreplicated:
        TP shards counted at full size, each tied factor once however many pipeline stages and
        virtual chunks hold a replica, per-layer factors summed over pipeline stages, a routed
        expert's factors summed over expert-parallel ranks."""
        # (tied, per layer) x (dense, routed expert's: experts.py, summed over EP ranks)
        counts = {(t, e): 0 for t in (True, False) for e in (True, False)}
        etp = _expert_tp_size()
        for ci, chunk in enumerate(self.chunks):
            for name, p in chunk.named_parameters():
                if not (p.requires_grad and is_adapter_param(name)):
                    continue
                expert = not getattr(p, "allreduce", True)  # sharded over expert TP, 1 or TP
                sharded = getattr(p, "tensor_model_parallel", False) and (not expert or etp > 1)
                n = p.numel() * (_tp_size() if sharded else 1)
                tied = name.startswith(BANK_ATTR + ".")
                counts[tied, expert] += 0 if tied and ci else n
        ep_group = _expert_parallel_group()
        _, pp_group = pipeline_rank_and_group()
        per_layer = counts[False, False] + _sum_over(counts[False, True], ep_group)
        return (
            counts[True, False]
            + _sum_over(counts[True, True], ep_group)
            + _sum_over(per_layer, pp_group)
        )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every factor as a full CPU tensor keyed by global layer, the same at every layout
        (`full_state.full_state_dict`). Collective over the model-parallel and expert-parallel
        ranks."""
        from tiedlora_megatron.full_state import full_state_dict

        return full_state_dict(self)

    def load_full_state_dict(
        self, state: dict[str, torch.Tensor], strict: bool = True
    ) -> list[str]:
        """Set every factor from full tensors keyed as `full_state_dict` returns them; returns
        the keys not in `state` (`full_state.load_full_state_dict`). Collective likewise."""
        from tiedlora_megatron.full_state import load_full_state_dict

        return load_full_state_dict(self, state, strict)

    def detach(self) -> None:
        """Stop every adapter from adding its update (parameters stay in the model)."""
        for chunk_adapters in self.adapters:
            for adapter in chunk_adapters.values():
                adapter.detach()

    def __repr__(self) -> str:
        n = sum(len(a) for a in self.adapters)
        return f"TiedLoRAAdapters({self.config.factors!r}, tied={self.config.tied}, {n} adapted layers)"


def is_adapter_param(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == BANK_ATTR or any(p.endswith(ADAPTER_SUFFIX) for p in parts[:-1])


def _sum_over(count: int, group: dist.ProcessGroup | None) -> int:
    if group is None:
        return count
    t = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t.item())


def _expert_parallel_group() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_expert_model_parallel_world_size() == 1:
        return None
    return ps.get_expert_model_parallel_group()


def _expert_tp_size() -> int:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1
    return ps.get_expert_tensor_parallel_world_size()


def _tp_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def _check_chunk(chunk: nn.Module, index: int) -> None:
    from megatron.core.distributed import DistributedDataParallel

    if isinstance(chunk, (DistributedDataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"model chunk {index} is already wrapped in {type(chunk).__name__}: apply "
            "apply_tied_lora to the bare model first, then wrap it (DDP allocates gradient "
            "buffers for the parameters that are trainable when it is built)"
        )
    if hasattr(chunk, BANK_ATTR) or any(
        n.endswith(ADAPTER_SUFFIX) for n, _ in chunk.named_modules()
    ):
        raise RuntimeError(f"model chunk {index} already has Tied-LoRA adapters")


def _layer_number(chunk: nn.Module, name: str) -> int | None:
    """The global (pipeline-offset) layer number of the closest enclosing transformer layer."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        number = getattr(chunk.get_submodule(".".join(parts[:end])), "layer_number", None)
        if isinstance(number, int):
            return number
    return None


def _find_targets(chunks: list[nn.Module], config: TiedLoRAConfig) -> list[_Target]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    targets, linear_names = [], set()
    routed = any(experts.is_routed(t) for t in config.target_modules)
    for ci, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            kind = experts.target_kind(name)
            if routed:
                experts.check_experts_module(name, module)
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or te_layer_name(
                module
            ):
                linear_names.add(kind)
            if kind in config.target_modules:
                parent = chunk.get_submodule(name.rsplit(".", 1)[0]) if "." in name else chunk
                if is_fused_te_mlp(parent):
                    raise UnsupportedLayerError(
                        f"{name}: megatron's TEFusedMLP (use_te_op_fuser=True) runs its layers "
                        "as fused TE ops without calling their forward, so an adapter on them "
                        "would never run; build the model with use_te_op_fuser=False"
                    )
                expert = experts.expert_index(chunk, name)
                targets.append(_Target(ci, name, kind, module, parent, expert))
    found = {x.kind for x in targets}
    _, pp_group = pipeline_rank_and_group()
    if pp_group is not None:  # a stage may lack a kind (MoE layers on some stages only)
        stages: list = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, (found, linear_names), group=pp_group)
        found = set().union(*(f for f, _ in stages))
        linear_names = set().union(*(n for _, n in stages))
    missing = [t for t in config.target_modules if t not in found]
    if missing:
        raise ConfigError(
            f"target module(s) {', '.join(map(repr, missing))} matched no module in the model; "
            f"its tensor-parallel linear layers are named: {', '.join(sorted(linear_names)) or 'none'}"
        )
    return targets


def _hidden_states_require_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Make a transformer block's input a grad-requiring leaf (see `_enable_recompute_grads`)."""
    if not torch.is_grad_enabled():
        return args, kwargs
    if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
        args = (args[0].detach().requires_grad_(True), *args[1:])
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and not hidden.requires_grad:
        kwargs = {**kwargs, "hidden_states": hidden.detach().requires_grad_(True)}
    return args, kwargs


def _enable_recompute_grads(chunk: nn.Module) -> None:
    """megatron's full activation recompute runs each group of layers in a reentrant autograd
    Function, which gets no backward at all when none of its inputs requires grad. With a
    frozen embedding the first layers' input does not, so the adapters in them would silently
    get no gradient: make every full-recompute block's input require grad."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    for module in chunk.modules():
        if isinstance(module, TransformerBlock) and module.config.recompute_granularity == "full":
            module.register_forward_pre_hook(_hidden_states_require_grad, with_kwargs=True)


def apply_tied_lora(
    model: nn.Module | Sequence[nn.Module], config: TiedLoRAConfig
) -> TiedLoRAAdapters:
    """Freeze `model` (a megatron-core module or a list of pipeline chunks) and add adapters.

    Every target layer gets a `TiedLoRAAdapter`; with `config.tied`, each chunk gets one
    `TiedFactorBank` (attribute `tied_adapter`) owning the shared A and B of every target kind.
    The model's outputs are unchanged until the adapters train (ΔW = 0 at the start).
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for ci, chunk in enumerate(chunks):
        _check_chunk(chunk, ci)
    targets = _find_targets(chunks, config)
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)

    adapters: list[dict[str, TiedLoRAAdapter]] = [{} for _ in chunks]
    banks: list[TiedFactorBank | None] = [TiedFactorBank() if config.tied else None for _ in chunks]
    for t in targets:
        layout = describe_linear(t.module, t.name)
        layer_number = _layer_number(chunks[t.chunk], t.name)
        weight = t.module.weight
        bank = banks[t.chunk]
        if bank is None:
            if layer_number is None:
                raise ConfigError(
                    f"{t.name}: untied factors are seeded per layer, but no enclosing module "
                    "has a `layer_number` (a megatron-core TransformerLayer)"
                )
            factors = LowRankFactors(
                config,
                t.kind,
                layout,
                layer_number=layer_number,
                expert=t.expert,
                dtype=weight.dtype,
                device=weight.device,
            )
        else:
            pair_expert = None if config.tie_experts else t.expert
            key = experts.bank_key(t.kind, pair_expert)
            if key not in bank:
                bank[key] = LowRankFactors(
                    config,
                    t.kind,
                    layout,
                    expert=pair_expert,
                    dtype=weight.dtype,
                    device=weight.device,
                )
                if t.expert is not None and pair_expert is None:
                    experts.mark_tied_across_experts(
                        list(bank[key].parameters()), layout, t.module.config
                    )
            factors = bank[key]
            if factors.layout != layout:
                raise ConfigError(
                    f"{t.name}: tied factors need every {t.kind} to have one shape and layout, "
                    f"but this one is {layout.parallel} {layout.out_features}x{layout.in_features} "
                    f"and another is {factors.layout.parallel} "
                    f"{factors.layout.out_features}x{factors.layout.in_features}; use tied=False"
                )
        adapter = TiedLoRAAdapter(
            config,
            t.kind,
            t.name,
            layout,
            factors,
            owns_factors=bank is None,
            layer_number=layer_number,
            expert=t.expert,
        )
        if t.expert is not None:
            own = [adapter.u, adapter.v]
            if bank is None or factors.expert is not None:
                own += [factors.A, factors.B]
            experts.mark_per_expert(own, layout)
        attr = t.name.rsplit(".", 1)[-1] + ADAPTER_SUFFIX
        if hasattr(t.parent, attr):
            raise RuntimeError(f"{t.name}: its parent already has an attribute {attr!r}")
        t.parent.add_module(attr, adapter)
        adapter.attach(t.module)
        adapters[t.chunk][t.name] = adapter
    for chunk, bank in zip(chunks, banks, strict=True):
        if bank is not None:
            chunk.add_module(BANK_ATTR, bank)
    mark_tied_replicas(chunks)
    track_replicas(chunks)
    for chunk in chunks:
        _enable_recompute_grads(chunk)
    return TiedLoRAAdapters(config, chunks, adapters, banks)
