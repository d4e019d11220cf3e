"""megatron-core's MoE GPT on CPU/gloo under the CPU runtime (runtime/moe.py): a tiny model with 4
experts and top-2 routing at EP=2 and EP2 x TP2 with sequence parallelism, both token
dispatchers, against the same weights in one process at EP=1 / TP=1 (each rank computes that
reference itself): token losses, and every parameter's gradient after megatron's DDP and
finalize_model_grads (the reference: the mean loss over the data-parallel ranks' batches)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import ProcessGroupPool
from tests.tiny_moe import (
    EXPERTS,
    copy_ep1_weights,
    moe_batch,
    moe_config,
    moe_gpt,
    shard_of,
    token_losses,
)

WORLD = 4


@pytest.fixture(scope="module")
def pool():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessGroupPool(WORLD) as p:
        yield p


def _matches_ep1(tp: int, ep: int, sp: bool, dispatcher: str) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    dp = torch.distributed.get_world_size() // tp
    batches = [moe_batch(i) for i in range(dp)]
    ps.initialize_model_parallel()
    try:
        reference = moe_gpt(moe_config(dispatcher=dispatcher))
        weights = {n: p.detach().clone() for n, p in reference.named_parameters()}
        ref_losses = [token_losses(reference, b) for b in batches]
        torch.stack([t.mean() for t in ref_losses]).mean().backward()
        grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    finally:
        ps.destroy_model_parallel()

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    try:
        config = moe_config(tp, ep, sp, dispatcher)
        gpt = moe_gpt(config)
        names = copy_ep1_weights(gpt, weights)
        dp_rank = ps.get_data_parallel_rank()
        model = DistributedDataParallel(
            config=config, ddp_config=DistributedDataParallelConfig(), module=gpt
        )
        losses = token_losses(model, batches[dp_rank])
        torch.testing.assert_close(losses, ref_losses[dp_rank].detach(), rtol=1e-5, atol=1e-5)
        losses.mean().backward()
        finalize_model_grads([model])
        checked = 0
        for n, p in gpt.named_parameters():
            expected = shard_of(n, p, grads[names[n]])
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
