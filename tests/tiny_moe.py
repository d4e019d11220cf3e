"""A tiny megatron-core MoE GPT for CPU tests: 2 layers of 4 experts with top-2 routing
(SequentialMLP experts from the local spec), optionally a shared expert and SwiGLU experts."""

from __future__ import annotations

import dataclasses
import re

import torch

SEQ, VOCAB, HIDDEN, MBS, SEED, EXPERTS = 8, 64, 32, 2, 1234, 4


def moe_config(
    tp: int = 1,
    ep: int = 1,
    sp: bool = False,
    dispatcher: str = "alltoall",
    etp: int | None = None,
    shared_expert: bool = False,
    gated: bool = False,
):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tiedlora_megatron.spec import unfused_settings

    extra = {"moe_shared_expert_intermediate_size": HIDDEN} if shared_expert else {}
    return TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=2 * HIDDEN,
        num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=HIDDEN,
        moe_token_dispatcher_type=dispatcher, tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, sequence_parallel=sp,
        gated_linear_unit=gated, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, add_bias_linear=False, **extra, **unfused_settings(),
    )  # fmt: skip


def moe_gpt(config, grouped_gemm: bool = False):
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from tiedlora_megatron.spec import SequenceParallelNorm

    layer = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=grouped_gemm)
    norms = {"input_layernorm": SequenceParallelNorm, "pre_mlp_layernorm": SequenceParallelNorm}
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, **norms))
    block = TransformerBlockSubmodules(
        layer_specs=[layer] * config.num_layers, layer_norm=SequenceParallelNorm
    )
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    return GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=VOCAB, max_sequence_length=SEQ,
        share_embeddings_and_output_weights=False, position_embedding_type="learned_absolute",
    )  # fmt: skip


def moe_batch(index: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(index))
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    return model(batch["tokens"], positions, None, labels=batch["labels"])


def global_name(name: str, ep_rank: int, local_experts: int) -> str:
    """The EP=1 name of a parameter: local expert i of EP rank r is global r * local + i."""
    m = re.search(r"local_experts\.(\d+)\.", name)
    if m is None:
        return name
    return f"{name[: m.start(1)]}{ep_rank * local_experts + int(m.group(1))}{name[m.end(1) :]}"


def shard_of(
    name: str, param: torch.nn.Parameter, full: torch.Tensor, gated: bool = False
) -> torch.Tensor:
    """This rank's shard of parameter `name`'s full tensor: an expert's over the expert-TP
    group, anything else over the TP group; a gated fc1's is [gate shard; up shard]."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    if "local_experts" in name:
        size = ps.get_expert_tensor_parallel_world_size()
        rank = ps.get_expert_tensor_parallel_rank()
    else:
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if gated and name.endswith("linear_fc1.weight"):
        return torch.cat([half.chunk(size)[rank] for half in full.chunk(2)])
    return full.chunk(size, dim=param.partition_dim)[rank]


def copy_ep1_weights(gpt, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Give `gpt` (any TP / EP) the EP 1 / TP 1 model's `weights`; returns local name -> the
    EP 1 name."""
    from megatron.core import parallel_state as ps

    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    names = {n: global_name(n, ep_rank, EXPERTS // ep) for n, _ in gpt.named_parameters()}
    with torch.no_grad():
        for n, p in gpt.named_parameters():
            p.copy_(shard_of(n, p, weights[names[n]], gpt.config.gated_linear_unit))
    return names
