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

    extra = {}
    if variant == "recompute_full":
        extra = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif variant == "recompute_selective":
        extra = dict(recompute_granularity="selective")
    config = init_layout(tp, pp, vpp, num_layers=NUM_LAYERS, **extra)
    try:
        chunks = build_chunks(config, seed=11)
        if save_base:  # the reference run that also writes the base weights
            save_base_weights(chunks[0], ckpt_dir)
        elif save_base is False:  # a layout under test (None: a further reference run)
            load_base(chunks, ckpt_dir)
        cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
        adapters = apply_tied_lora(chunks, cfg)
        ddp_kwargs = {}
        if variant in ("distopt", "distopt_overlap"):
            ddp_kwargs["use_distributed_optimizer"] = True  # the reference uses plain DDP
        if variant in ("overlap", "distopt_overlap"):
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
            loss, norm = train_step(ddp, optimizer, data, config)
            norms.append(norm)
            losses.append(loss)
        return dict(records=_local_factors(adapters), norms=norms, losses=losses)
    finally:
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
