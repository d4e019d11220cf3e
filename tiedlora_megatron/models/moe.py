"""Mixture-of-experts GPTs (HF Mixtral, Qwen2-MoE, Qwen3-MoE) in megatron-core: their `GPTArch` fields,
HF tensor names, and the loading of router, routed experts and shared expert.

Every layer is an MoE layer (Mixtral; Qwen2-MoE with `decoder_sparse_step=1` and no
`mlp_only_layers`; Qwen3-MoE likewise). Routing matches transformers exactly: Mixtral takes the top k of the router
logits and softmaxes over them, which equals its softmax over all experts renormalised over the
top k (megatron's default, `moe_router_pre_softmax=False`), as do the Qwen MoEs with
`norm_topk_prob`; without it they softmax over all experts and keep the top k probabilities
unnormalised (`moe_router_pre_softmax=True`). No token is dropped (no capacity factor) and no auxiliary loss
is added (`moe_router_load_balancing_type="none"`), so the logits are the HF model's.

The experts are megatron-core's `SequentialMLP` (local spec, `moe_grouped_gemm=False`): each
expert-parallel rank loads its own experts (`num_local_experts` of them, global index
`ep_rank * num_local_experts + i`), whole at expert tensor parallelism 1, or its expert-TP shard.
The shared expert is an ordinary tensor-parallel MLP, with Qwen2-MoE's sigmoid gate
(`moe_shared_expert_gate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tiedlora_megatron.models.arch import GPTArch
    from tiedlora_megatron.models.hf import WeightEntry

#: HF model types of MoE GPTs and the attention family (tensor names, biases) they share.
MOE_MODEL_TYPES = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}

#: Per family: HF module paths under `layers.<i>.` of the router, the experts, their
#: gate / up / down projections, the shared expert and its gate.
_HF_MOE_NAMES = {
    "mixtral": dict(
        router="block_sparse_moe.gate",
        experts="block_sparse_moe.experts",
        proj={"gate": "w1", "up": "w3", "down": "w2"},
    ),
    "qwen2_moe": dict(
        router="mlp.gate",
        experts="mlp.experts",
        proj={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        shared="mlp.shared_expert",
        shared_gate="mlp.shared_expert_gate",
    ),
    "qwen3_moe": dict(
        router="mlp.gate",
        experts="mlp.experts",
        proj={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    ),
}


def moe_arch_fields(cfg: dict) -> dict[str, Any]:
    """The GPTArch MoE fields of an HF MoE config (refusing what megatron cannot reproduce)."""
    model_type = cfg["model_type"]
    if model_type == "mixtral":
        return dict(
            num_moe_experts=cfg["num_local_experts"],
            moe_router_topk=cfg["num_experts_per_tok"],
            moe_ffn_hidden_size=cfg["intermediate_size"],
        )
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise ValueError(
            f"{model_type} with dense layers (decoder_sparse_step != 1 or mlp_only_layers) is not "
            "supported: every layer must be an MoE layer"
        )
    shared = cfg.get("shared_expert_intermediate_size") or None
    return dict(
        num_moe_experts=cfg["num_experts"],
        moe_router_topk=cfg["num_experts_per_tok"],
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=shared is not None,
        moe_router_pre_softmax=not cfg.get("norm_topk_prob", False),
    )


def moe_config_fields(arch: GPTArch, ep: int, etp: int = 1) -> dict[str, Any]:
    """TransformerConfig fields of an MoE arch at expert parallelism `ep` and expert tensor
    parallelism `etp` (none if dense)."""
    if not arch.num_moe_experts:
        return {}
    return dict(
        num_moe_experts=arch.num_moe_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=arch.moe_shared_expert_gate,
        moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def moe_parallel_problems(
    arch: GPTArch, tp: int, ep: int, sequence_parallel: bool, etp: int = 1
) -> list[str]:
    """What an MoE arch cannot do at this layout (empty for a dense arch at EP 1)."""
    if not arch.num_moe_experts:
        return [] if ep == 1 else [f"expert_model_parallel_size={ep} needs an MoE model"]
    problems = []
    if arch.moe_ffn_hidden_size % etp:
        problems.append(
            f"moe_ffn_hidden_size={arch.moe_ffn_hidden_size} cannot be split over "
            f"expert_tensor_parallel_size={etp}"
        )
    if arch.num_moe_experts % ep:
        problems.append(
            f"{arch.num_moe_experts} experts cannot be split over expert_model_parallel_size={ep}"
        )
    if tp > 1 and not sequence_parallel:
        problems.append(
            "megatron-core runs MoE layers under tensor parallelism only with sequence "
            "parallelism: set sequence_parallel=True (the job: parallel.sp=true)"
        )
    return problems


def moe_weight_names(arch: GPTArch, prefix: str) -> dict[str, WeightEntry]:
    """Canonical names -> HF tensors of the MoE MLPs (see `moe_expected_shape`)."""
    from tiedlora_megatron.models.hf import WeightEntry

    hf = _HF_MOE_NAMES[arch.family]
    names = {}
    for i in range(arch.num_layers):
        layer = f"{prefix}layers.{i}."
        names[f"layers.{i}.router"] = WeightEntry(f"{layer}{hf['router']}.weight")
        for e in range(arch.num_moe_experts):
            for short, proj in hf["proj"].items():
                tensor = f"{layer}{hf['experts']}.{e}.{proj}.weight"
                names[f"layers.{i}.experts.{e}.{short}"] = WeightEntry(tensor)
        if "shared" in hf:
            for short, proj in hf["proj"].items():
                tensor = f"{layer}{hf['shared']}.{proj}.weight"
                names[f"layers.{i}.shared.{short}"] = WeightEntry(tensor)
            names[f"layers.{i}.shared_gate"] = WeightEntry(f"{layer}{hf['shared_gate']}.weight")
    return names


def moe_expected_shape(arch: GPTArch, name: str) -> tuple[int, ...] | None:
    """The [out, in] shape of an MoE tensor name, None for any other name."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "layers" or not arch.num_moe_experts:
        return None
    h = arch.hidden_size
    if parts[2] == "router":
        return (arch.num_moe_experts, h)
    if parts[2] == "shared_gate":
        return (1, h)
    sizes = {
        "experts": arch.moe_ffn_hidden_size,
        "shared": arch.moe_shared_expert_intermediate_size,
    }
    if parts[2] not in sizes:
        return None
    ffn = sizes[parts[2]]
    return (h, ffn) if parts[-1] == "down" else (ffn, h)


def load_moe_mlp(mlp, arch: GPTArch, src, layer: int, rank: int, tp: int, copy) -> None:
    """Fill one MoELayer (`mlp`) of layer `layer` from `src`; `copy(param, value, what)`.
    Routed experts are split over their expert-TP group (fc1 by rows, [gate; up] per shard as
    megatron's SwiGLU, fc2 by columns), the shared expert over the TP group."""
    p = f"layers.{layer}."
    copy(mlp.router.weight, src.full(p + "router"), f"layer {layer} router")
    experts = mlp.experts
    first = experts.ep_group.rank() * experts.num_local_experts
    for i, expert in enumerate(experts.local_experts):
        q, what = f"{p}experts.{first + i}.", f"layer {layer} expert {first + i}"
        group = expert.linear_fc1.tp_group
        size = arch.moe_ffn_hidden_size // group.size()
        lo, hi = group.rank() * size, (group.rank() + 1) * size
        fc1 = torch.cat([src.rows(q + "gate", lo, hi), src.rows(q + "up", lo, hi)])
        copy(expert.linear_fc1.weight, fc1, f"{what} fc1")
        copy(expert.linear_fc2.weight, src.cols(q + "down", lo, hi), f"{what} fc2")
    shared = getattr(mlp, "shared_experts", None)
    if shared is None:
        return
    size = arch.moe_shared_expert_intermediate_size // tp
    lo, hi = rank * size, (rank + 1) * size
    fc1 = torch.cat([src.rows(p + "shared.gate", lo, hi), src.rows(p + "shared.up", lo, hi)])
    copy(shared.linear_fc1.weight, fc1, f"layer {layer} shared expert fc1")
    copy(shared.linear_fc2.weight, src.cols(p + "shared.down", lo, hi), f"layer {layer} shared fc2")
    if getattr(shared, "gate_weight", None) is not None:
        copy(shared.gate_weight, src.full(p + "shared_gate"), f"layer {layer} shared expert gate")
