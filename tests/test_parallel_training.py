"""Tied factors under pipeline, virtual pipeline and data parallelism, against a reference.

The reference trains the same base (moved between layouts by megatron's dist_checkpointing)
with vBuA on all four targets at TP = PP = 1, every rank seeing the whole global batch: that is
the single-process computation. Each layout then trains 3 steps through megatron's schedules,
DDP, gradient finalisation and optimizer on its share of the same global batch; afterwards the
adapter parameters, assembled from every rank's shards, equal the reference's, every replica
of a tied factor is identical, and the grad norm megatron's clipping reports equals the
reference's at every step.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import ProcessGroupPool

WORLD = 4
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
NUM_LAYERS, RANK, STEPS, GLOBAL_MICRO_BATCHES = 8, 4, 3, 8


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(WORLD) as p:
        yield p


def _layout(lay) -> dict:
    return {"parallel": lay.parallel, "gated": lay.gated}


def _local_factors(adapters) -> list[dict]:
    """Every adapter tensor of this rank with what is needed to place it in the full tensor."""
    from megatron.core import parallel_state as ps

    records = []
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    for ci, chunk_adapters in enumerate(adapters.adapters):
        for ad in chunk_adapters.values():
            lay = ad.layout
            params = {"u": ad.u, "v": ad.v}
            if adapters.banks[ci] is None:
                params.update(A=ad.lowrank.A, B=ad.lowrank.B)
            for f, p in params.items():
                if p is not None:
                    records.append(
                        dict(
                            key=(ad.kind, f, ad.layer_number),
                            tensor=p.detach().clone(),
                            layout=_layout(lay),
                            tp_rank=tp_rank,
                            replica=(pp_rank, ci, dp_rank),
                        )
                    )
        bank = adapters.banks[ci]
        if bank is not None:
            for kind, factors in bank.items():
                for f in ("A", "B"):
                    records.append(
                        dict(
                            key=(kind, f, None),
                            tensor=getattr(factors, f).detach().clone(),
                            layout=_layout(factors.layout),
                            tp_rank=tp_rank,
                            replica=(pp_rank, ci, dp_rank),
                        )
                    )
    return records


def _assemble(all_records: list[list[dict]]) -> dict:
    """Full tensors from every rank's shards; checks that all replicas of a shard are equal."""
    shards: dict = {}
    for records in all_records:
        for r in records:
            slot = shards.setdefault(r["key"], {})
            prev = slot.get(r["tp_rank"])
            if prev is None:
                slot[r["tp_rank"]] = r
            else:
                assert torch.equal(prev["tensor"], r["tensor"]), (
                    f"replicas of {r['key']} differ: {prev['replica']} vs {r['replica']}"
                )
    full = {}
    for key, slot in shards.items():
        parts = [slot[t] for t in sorted(slot)]
        lay, f = parts[0]["layout"], key[1]
        tensors = [p["tensor"] for p in parts]
        sharded_dim = None
        if lay["parallel"] == "column" and f in ("B", "v"):
            sharded_dim = 0
        elif lay["parallel"] == "row" and f == "A":
            sharded_dim = 1
        if sharded_dim is None or len(tensors) == 1:
            full[key] = tensors[0]
        elif lay["gated"]:
            halves = [t.chunk(2, dim=0) for t in tensors]
            full[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            full[key] = torch.cat(tensors, dim=sharded_dim)
    return full


def _train_layout(
    ckpt_dir: str, tp: int, pp: int, vpp: int | None, variant: str, save_base: bool | None
) -> dict:
    from megatron.core import parallel_state as ps

    from tests.tiny_gpt import (
        batches,
        build_chunks,
        init_layout,
        load_base,
        make_optimizer,
        train_step,
        wrap_ddp,
    )
    from tests.tiny_gpt import save_base as save_base_weights
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.pipeline import configure_tied_grad_sync

    extra = {}
    if variant == "recompute_full":
        extra = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif variant == "recompute_selective":
        extra = dict(recompute_granularity="selective")
    config = init_layout(tp, pp, vpp, num_layers=NUM_LAYERS, **extra)
    finalize = FINALIZE.get(variant, "ours")
    if variant == "sync_off":  # the tied-replica sum and its guard switched off
        configure_tied_grad_sync(on_ddp_grad_sync=False, guard=False)
    try:
        chunks = build_chunks(config, seed=11)
        if save_base:  # the reference run that also writes the base weights
            save_base_weights(chunks[0], ckpt_dir)
        elif save_base is False:  # a layout under test (None: a further reference run)
            load_base(chunks, ckpt_dir)
        cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
        adapters = apply_tied_lora(chunks, cfg)
        ddp_kwargs = {}
        if "distopt" in variant:
            ddp_kwargs["use_distributed_optimizer"] = True  # the reference uses plain DDP
        if "overlap" in variant:
            ddp_kwargs.update(overlap_grad_reduce=True, bucket_size=2000)
        ddp = wrap_ddp(chunks, config, **ddp_kwargs)
        if "distopt" in variant:  # megatron's distributed optimizer supports only Adam
            # eps above most gradient entries keeps Adam's update close to linear in them, so
            # fp32 rounding is not amplified into relative differences of 1e-3.
            opt_kwargs = dict(
                lr=1e-3,
                optimizer="adam",
                adam_eps=1e-2,
                use_distributed_optimizer=ddp_kwargs.get("use_distributed_optimizer", False),
            )
        else:
            opt_kwargs = dict(lr=0.5, optimizer="sgd", sgd_momentum=0.9)
        optimizer = make_optimizer(ddp, clip_grad=1.0, **opt_kwargs)
        data = batches(GLOBAL_MICRO_BATCHES, seed=21)
        if save_base is False:  # references see the whole global batch on every rank
            dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            per_rank = GLOBAL_MICRO_BATCHES // dp
            data = data[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        norms, losses = [], []
        for _ in range(STEPS):
            loss, norm = train_step(ddp, optimizer, data, config, finalize)
            norms.append(norm)
            losses.append(loss)
        return dict(records=_local_factors(adapters), norms=norms, losses=losses)
    finally:
        configure_tied_grad_sync()
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def base_checkpoint(pool, tmp_path_factory):
    """The base weights, and the reference run with SGD, from one TP1 x PP1 run."""
    ckpt = str(tmp_path_factory.mktemp("base") / "ckpt")
    results = pool.run(_train_layout, ckpt, 1, 1, None, "plain", True)
    return ckpt, {"plain": (_assemble([r["records"] for r in results]), results[0]["norms"])}


@pytest.fixture
def reference(pool, base_checkpoint, request):
    """(base checkpoint, reference full adapter tensors, reference grad norms) for the
    optimizer the layout under test uses (SGD, or Adam for the distributed optimizer)."""
    ckpt, cache = base_checkpoint
    kind = "distopt" if "distopt" in request.node.callspec.params["variant"] else "plain"
    if kind not in cache:
        results = pool.run(_train_layout, ckpt, 1, 1, None, "reference_" + kind, None)
        cache[kind] = (_assemble([r["records"] for r in results]), results[0]["norms"])
    return (ckpt, *cache[kind])


#: How a variant finalises gradients (`tiny_gpt.train_step`); the rest use ours.
FINALIZE = {
    "megatron_finalize": "megatron",
    "distopt_overlap_megatron_finalize": "megatron",
    "megatron_direct": "megatron_direct",
    "sync_off": "megatron",
}

LAYOUTS = [
    # (tp, pp, vpp, variant); DP = 4 / (tp * pp)
    (1, 1, None, "plain"),
    (2, 1, None, "plain"),
    (1, 2, None, "plain"),
    (2, 2, None, "plain"),
    (1, 2, 2, "plain"),
    (2, 2, 2, "plain"),
    (1, 4, 2, "plain"),
    (1, 2, 2, "distopt"),
    (2, 1, None, "distopt_overlap"),
    (1, 2, 2, "overlap"),
    (2, 2, 2, "recompute_full"),
    (1, 2, None, "recompute_selective"),
    # Trainers' finalize functions: megatron-core's own, set as config.finalize_model_grads_func
    # after apply_tied_lora (as Megatron-LM and Megatron-Bridge do), or called directly.
    (1, 2, None, "megatron_finalize"),
    (2, 2, 2, "megatron_finalize"),
    (1, 2, 2, "megatron_direct"),
    (1, 2, 2, "distopt_overlap_megatron_finalize"),
]


@pytest.mark.parametrize("tp,pp,vpp,variant", LAYOUTS, ids=lambda v: str(v))
def test_layout_matches_single_process_reference(pool, reference, tp, pp, vpp, variant):
    ckpt, want, want_norms = reference
    results = pool.run(_train_layout, ckpt, tp, pp, vpp, variant, False)
    got = _assemble([r["records"] for r in results])
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
    for r in results:
        torch.testing.assert_close(r["norms"], want_norms, rtol=1e-4, atol=1e-6)


def test_without_the_replica_sum_megatron_finalize_is_wrong(pool, base_checkpoint):
    """The control for the megatron-finalize layouts above: the same PP=2 x VPP=2 run with the
    replica sum switched off leaves the tied replicas apart and misses the reference."""
    ckpt, cache = base_checkpoint
    want, want_norms = cache["plain"]
    results = pool.run(_train_layout, ckpt, 1, 2, 2, "sync_off", False)
    records = [r["records"] for r in results]
    with pytest.raises(AssertionError, match="replicas of .* differ"):
        _assemble(records)
    primary = [[r for r in rank if r["replica"][:2] == (0, 0)] for rank in records]
    got = _assemble(primary)
    tied = [k for k in want if k[2] is None]
    assert tied and not all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5) for k in tied)
    assert not torch.allclose(torch.tensor(results[0]["norms"]), torch.tensor(want_norms))


def _guard_and_manual_sync() -> dict:
    """Two local chunks (two replicas, no DDP) stepped by a plain torch optimizer."""
    from megatron.core import parallel_state as ps

    from tests.tiny_gpt import batches, build_gpt, gpt_config
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.pipeline import TiedReplicaSyncError, sync_tied_factor_grads

    ps.initialize_model_parallel()
    try:
        out = {}
        for manual_sync in (True, False):
            config = gpt_config()
            chunks = [build_gpt(config, seed=1), build_gpt(config, seed=2)]
            adapters = apply_tied_lora(chunks, TiedLoRAConfig.preset("vBuA", rank=4, alpha=8))
            opt = torch.optim.SGD(list(adapters.parameters()), lr=0.1)
            tokens, labels = batches(1, seed=3)[0]
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            out[manual_sync] = None
            try:
                for _ in range(3):
                    opt.zero_grad()
                    loss = sum(c(tokens, positions, None, labels=labels).mean() for c in chunks)
                    loss.backward()
                    if manual_sync:
                        sync_tied_factor_grads(chunks)
                        sync_tied_factor_grads(chunks)  # a second call in one step sums nothing
                    opt.step()
                a, b = (c.tied_adapter.linear_qkv.B for c in chunks)
                out[manual_sync] = "in sync" if torch.equal(a, b) else "apart"
            except TiedReplicaSyncError as e:
                out[manual_sync] = str(e)
        return out
    finally:
        ps.destroy_model_parallel()


def test_guard_names_a_step_without_the_replica_sum(pool):
    out = pool.run(_guard_and_manual_sync)[0]
    assert out[True] == "in sync"
    assert "without summing their gradients over their replicas" in out[False]
    assert "sync_tied_factor_grads" in out[False]
