"""Tied-LoRA on MoE layers under pipeline parallelism (with EP, or TP x SP x expert TP): optimizer steps
through megatron's own schedule, DDP, megatron's finalize_model_grads and distributed optimizer
equal the single-process run (TP = PP = EP = 1, which tests/test_moe_adapters.py checks against
a dense merged-weight reference): losses and every factor after the steps.

The factors tied across experts and the pairs per expert have a replica on every pipeline stage;
their gradients are summed over the stages (pipeline.py) on top of the expert reductions.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import ProcessGroupPool

WORLD, STEPS, MICRO_BATCHES = 4, 3, 4
TARGETS = ["linear_qkv", "experts.linear_fc1", "experts.linear_fc2"]
MOE = dict(
    num_layers=4, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
    moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
)  # fmt: skip


@pytest.fixture(scope="module")
def pool():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessGroupPool(WORLD) as p:
        yield p


def _train(ckpt: str, name: str, tp: int, pp: int, ep: int, etp: int, reference: bool) -> dict:
    from megatron.core import parallel_state as ps

    from tests.tiny_gpt import (
        batches,
        build_chunks,
        gpt_config,
        load_base,
        make_optimizer,
        save_base,
        train_step,
        wrap_ddp,
    )
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
    )  # fmt: skip
    try:
        config = gpt_config(
            tp=tp, pp=pp, sp=tp > 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
            pipeline_dtype=torch.float32, **MOE,
        )  # fmt: skip
        chunks = build_chunks(config, seed=11)
        if reference:
            if torch.distributed.get_rank() == 0:
                os.makedirs(ckpt, exist_ok=True)
            save_base(chunks[0], ckpt)
        else:
            load_base(chunks, ckpt)
        overrides = {"tie_experts": False} if name == "vBuA-per-expert" else {}
        cfg = TiedLoRAConfig.preset("vBuA", rank=4, alpha=8, target_modules=TARGETS, **overrides)
        adapters = apply_tied_lora(chunks, cfg)
        g = torch.Generator().manual_seed(5)
        start = {
            k: torch.randn(v.shape, generator=g) * 0.2 + (k[-1] in "uv")
            for k, v in adapters.full_state_dict().items()
        }
        adapters.load_full_state_dict(start)
        ddp = wrap_ddp(chunks, config, use_distributed_optimizer=True)
        optimizer = make_optimizer(
            ddp, lr=1e-2, optimizer="adam", adam_eps=1e-2, clip_grad=1.0,
            use_distributed_optimizer=True,
        )  # fmt: skip
        data = batches(MICRO_BATCHES, seed=21)
        if not reference:  # the reference sees the whole global batch on every rank
            dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            data = data[rank * MICRO_BATCHES // dp : (rank + 1) * MICRO_BATCHES // dp]
        losses, norms = [], []
        for _ in range(STEPS):
            loss, norm = train_step(ddp, optimizer, data, config, finalize="megatron")
            losses.append(loss)
            norms.append(norm)
        return {"state": adapters.full_state_dict(), "losses": losses, "norms": norms}
    finally:
        ps.destroy_model_parallel()


#: (adapter, tp, pp, ep, expert tp); TP 2 x EP 2 without PP: tests/test_moe_adapters.py
LAYOUTS = [("vBuA-per-expert", 1, 2, 2, 1), ("vBuA", 2, 2, 1, 2)]


@pytest.mark.parametrize(
    ("name", "tp", "pp", "ep", "etp"),
    LAYOUTS,
    ids=[f"{n}-tp{t}-pp{p}-ep{e}-etp{x}" for n, t, p, e, x in LAYOUTS],
)
def test_pipeline_with_experts_matches_single_process(pool, tmp_path, name, tp, pp, ep, etp):
    ckpt = str(tmp_path / "base")
    want = pool.run(_train, ckpt, name, 1, 1, 1, 1, True)[0]
    results = pool.run(_train, ckpt, name, tp, pp, ep, etp, False)
    for got in results:
        assert got["state"].keys() == want["state"].keys()
        for key, value in want["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        # The first step starts from the same factors: its grad norm agrees to fp32 reduction
        # order. Later ones start from factors that agree to ~1e-5, and top-k routing is
        # discontinuous in them: measured 3e-4 apart at TP 2 by step 3 (states still agree).
        assert got["norms"][0] == pytest.approx(want["norms"][0], rel=1e-4)
        assert got["norms"] == pytest.approx(want["norms"], rel=1e-3)
    # last-stage ranks report their data-parallel share's mean loss (each share equally often)
    last = torch.tensor([r["losses"] for r in results if r["losses"][0] is not None])
    assert len(last) and last.mean(0).tolist() == pytest.approx(want["losses"], rel=1e-5)
