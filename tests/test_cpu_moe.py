"""megatron-core's MoE GPT on CPU/gloo under the CPU runtime (runtime/moe.py): a tiny model with 4
experts and top-2 routing at EP=2 and EP2 x TP2 with sequence parallelism, both token
dispatchers, against the same weights in one process at EP=1 / TP=1 (each rank computes that
reference itself): token losses, and every parameter's gradient after megatron's DDP and
finalize_model_grads (the reference: the mean loss over the data-parallel ranks' batches)."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

from tests.dist import ProcessGroupPool

WORLD = 4
SEQ, VOCAB, HIDDEN, MBS, SEED, EXPERTS = 8, 64, 32, 2, 1234, 4


@pytest.fixture(scope="module")
def pool():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessGroupPool(WORLD) as p:
        yield p


def _config(tp: int = 1, ep: int = 1, sp: bool = False, dispatcher: str = "alltoall"):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tiedlora_megatron.spec import unfused_settings

    return TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=2 * HIDDEN,
        num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=HIDDEN,
        moe_token_dispatcher_type=dispatcher, tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep, sequence_parallel=sp, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False, **unfused_settings(),
    )  # fmt: skip


def _gpt(config):
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from tiedlora_megatron.spec import SequenceParallelNorm

    layer = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
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


def _batch(index: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(index))
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def _losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    return model(batch["tokens"], positions, None, labels=batch["labels"])


def _global_name(name: str, ep_rank: int, local_experts: int) -> str:
    """The EP=1 name of a parameter: local expert i of EP rank r is global r * local + i."""
    m = re.search(r"local_experts\.(\d+)\.", name)
    if m is None:
        return name
    return f"{name[: m.start(1)]}{ep_rank * local_experts + int(m.group(1))}{name[m.end(1) :]}"


def _shard(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    if getattr(param, "allreduce", True):  # dense: the TP group
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    else:  # an expert's: the expert-TP group
        size = ps.get_expert_tensor_parallel_world_size()
        rank = ps.get_expert_tensor_parallel_rank()
    return full.chunk(size, dim=param.partition_dim)[rank]


def _matches_ep1(tp: int, ep: int, sp: bool, dispatcher: str) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    dp = torch.distributed.get_world_size() // tp
    batches = [_batch(i) for i in range(dp)]
    ps.initialize_model_parallel()
    try:
        reference = _gpt(_config(dispatcher=dispatcher))
        weights = {n: p.detach().clone() for n, p in reference.named_parameters()}
        ref_losses = [_losses(reference, b) for b in batches]
        torch.stack([t.mean() for t in ref_losses]).mean().backward()
        grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    finally:
        ps.destroy_model_parallel()

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    try:
        config = _config(tp, ep, sp, dispatcher)
        gpt = _gpt(config)
        ep_rank, dp_rank = ps.get_expert_model_parallel_rank(), ps.get_data_parallel_rank()
        names = {n: _global_name(n, ep_rank, EXPERTS // ep) for n, _ in gpt.named_parameters()}
        with torch.no_grad():
            for n, p in gpt.named_parameters():
                p.copy_(_shard(p, weights[names[n]]))
        model = DistributedDataParallel(
            config=config, ddp_config=DistributedDataParallelConfig(), module=gpt
        )
        losses = _losses(model, batches[dp_rank])
        torch.testing.assert_close(losses, ref_losses[dp_rank].detach(), rtol=1e-5, atol=1e-5)
        losses.mean().backward()
        finalize_model_grads([model])
        checked = 0
        for n, p in gpt.named_parameters():
            expected = _shard(p, grads[names[n]])
            torch.testing.assert_close(p.main_grad, expected, rtol=1e-4, atol=1e-6, msg=n)
            checked += "local_experts" in n
        assert checked == 2 * 2 * (EXPERTS // ep)  # fc1 and fc2 of each local expert, 2 layers
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize(
    ("tp", "ep", "sp", "dispatcher"),
    [(1, 2, False, "alltoall"), (2, 2, True, "alltoall"), (2, 2, True, "allgather")],
    ids=["ep2-alltoall", "ep2-tp2-sp-alltoall", "ep2-tp2-sp-allgather"],
)
def test_moe_layout_matches_ep1(
    pool: ProcessGroupPool, tp: int, ep: int, sp: bool, dispatcher: str
) -> None:
    pool.run(_matches_ep1, tp, ep, sp, dispatcher)
