"""A tiny megatron-core GPT (local spec, GQA, SwiGLU) with adapters on all four targets.

- Training at TP=2 (sequence parallel off and on) gives the same losses as at TP=1 from the
  same base weights (moved between layouts by megatron's own dist_checkpointing), through
  megatron's schedule, DDP, finalize_model_grads and optimizer.
- Only adapter parameters train; base weights stay bit-identical while the loss falls.
- The adapters add exactly the collectives design.md predicts, each of T x r elements.
- Trainable-parameter counts of built models equal the formulas for every preset.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from tests.dist import ProcessGroupPool
from tests.tiny_gpt import (
    MICRO_BATCH,
    SEQ,
    batches,
    build_gpt,
    gpt_config,
    make_optimizer,
    train_step,
    wrap_ddp,
)

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
RANK = 4
STEPS = 3


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(2) as p:
        yield p


def _is_adapter(name: str) -> bool:
    return "tied_adapter." in name or "_adapter." in name


def _train(tp: int, sp: bool, ckpt_dir: str, save: bool) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        config = gpt_config(tp=tp, sp=sp)
        model = build_gpt(config, seed=1 if save else 2)
        if save:
            os.makedirs(ckpt_dir, exist_ok=True)
            dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
        else:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
        cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
        adapters = apply_tied_lora(model, cfg)
        base_before = {
            k: v.clone()
            for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not _is_adapter(k)
        }
        ddp = wrap_ddp([model], config)
        optimizer = make_optimizer(ddp, lr=1e-2)
        data = batches(2, seed=5)
        losses = [train_step(ddp, optimizer, data, config)[0] for _ in range(STEPS)]
        with torch.no_grad():  # the loss after the last step
            from tests.tiny_gpt import forward_step

            out, loss_fn = forward_step(iter(data[:1]), model)
            final = float(loss_fn(out)[0])
        trained, frozen_with_grad, changed = [], [], []
        for name, p in model.named_parameters():
            if _is_adapter(name) and p.requires_grad:
                trained.append(name)
                assert p.main_grad.abs().sum() > 0, f"{name} got no gradient"
            elif p.requires_grad or p.grad is not None or getattr(p, "main_grad", None) is not None:
                frozen_with_grad.append(name)
        for k, v in model.state_dict().items():
            if k in base_before and not torch.equal(base_before[k], v):
                changed.append(k)
        return dict(
            losses=losses,
            final=final,
            trained=sorted(trained),
            frozen_with_grad=frozen_with_grad,
            base_changed=changed,
            n_trainable=adapters.num_trainable_parameters(),
        )
    finally:
        ps.destroy_model_parallel()


def _tp_equivalence(sp: bool, ckpt_dir: str) -> tuple[dict, dict]:
    return _train(1, False, ckpt_dir, save=True), _train(2, sp, ckpt_dir, save=False)


@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_tp2_training_equals_tp1(pool, tmp_path, sp):
    results = pool.run(_tp_equivalence, sp, str(tmp_path / "base"))
    for rank, (tp1, tp2) in enumerate(results):
        for r in (tp1, tp2):
            assert r["frozen_with_grad"] == [] and r["base_changed"] == []
            assert r["final"] < r["losses"][0] - 0.05, r
            assert len(r["trained"]) > 0
        # The first loss is the base model's (ΔW = 0): equal across layouts; later ones track
        # forward, backward, gradient finalisation and the optimizer.
        torch.testing.assert_close(
            tp2["losses"], tp1["losses"], rtol=2e-5, atol=2e-5, msg=f"rank {rank}"
        )
        torch.testing.assert_close(tp2["final"], tp1["final"], rtol=2e-5, atol=2e-5)
        assert tp1["n_trainable"] == tp2["n_trainable"]


# -- collectives ---------------------------------------------------------------------------


def _count_collectives(sp: bool, with_adapters: bool) -> Counter:
    """(collective, local input numel) of one forward + backward at TP=2."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings

    from tests.tiny_gpt import forward_step
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    calls: Counter = Counter()
    originals = {}

    def wrap(owner, name, label):
        fn = getattr(owner, name)
        originals[(owner, name)] = fn

        def counted(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            # all_reduce(t); all_gather_into_tensor(out, in); reduce_scatter_tensor(out, in)
            local = tensors[0] if label == "all_reduce" else tensors[1]
            calls[(label, local.numel())] += 1
            return fn(*args, **kwargs)

        setattr(owner, name, counted)

    try:
        config = gpt_config(tp=2, sp=sp)
        model = build_gpt(config, seed=3)
        if with_adapters:
            cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, target_modules=TARGETS)
            apply_tied_lora(model, cfg)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
        # A trainable embedding in both runs, so the base's backward runs in both.
        model.embedding.word_embeddings.weight.requires_grad_(True)
        for owner, name, label in [
            (dist, "all_reduce", "all_reduce"),
            (dist, "all_gather_into_tensor", "all_gather"),
            (dist, "reduce_scatter_tensor", "reduce_scatter"),
            (mappings, "dist_all_gather_func", "all_gather"),
            (mappings, "dist_reduce_scatter_func", "reduce_scatter"),
        ]:
            wrap(owner, name, label)
        out, loss_fn = forward_step(iter(batches(1, seed=9)), model)
        loss_fn(out)[0].backward()
        return calls
    finally:
        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)
        ps.destroy_model_parallel()


def _collective_diff(sp: bool) -> dict:
    base = _count_collectives(sp, with_adapters=False)
    adapted = _count_collectives(sp, with_adapters=True)
    extra = adapted - base
    missing = base - adapted
    return {"extra": dict(extra), "missing": dict(missing)}


@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_adapters_add_only_rank_r_collectives(pool, sp):
    tokens = SEQ * MICRO_BATCH
    adapted_layers = 2 * len(TARGETS)  # 2 transformer layers
    for diff in pool.run(_collective_diff, sp):
        assert diff["missing"] == {}
        if sp:
            # Column: all-gather of z forward, reduce-scatter of dz backward; row: the reverse.
            # Each moves T/tp x r elements per rank (the same bytes as one T x r all-reduce).
            local = tokens // 2 * RANK
            assert diff["extra"] == {
                ("all_gather", local): adapted_layers,
                ("reduce_scatter", tokens * RANK): adapted_layers,
            }
        else:
            # One T x r all-reduce per adapted layer: dz for column bases, h for row bases.
            assert diff["extra"] == {("all_reduce", tokens * RANK): adapted_layers}


# -- parameter counts ------------------------------------------------------------------------


def _counts_for_presets(tp: int) -> list[tuple[str, int, int, int]]:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron import (
        ModelDims,
        TiedLoRAConfig,
        apply_tied_lora,
        count_trainable_parameters,
    )
    from tiedlora_megatron.config import PRESETS

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        rows = []
        for name in PRESETS:
            config = gpt_config(tp=tp)
            model = build_gpt(config)
            cfg = TiedLoRAConfig.preset(name, rank=RANK, target_modules=TARGETS)
            adapters = apply_tied_lora(model, cfg)
            local = sum(p.numel() for p in model.parameters() if p.requires_grad)
            formula = count_trainable_parameters(cfg, ModelDims.from_transformer_config(config))
            rows.append((name, adapters.num_trainable_parameters(), formula, local))
        return rows
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("tp", [1, 2])
def test_built_model_counts_equal_formula(pool, tp):
    for rows in pool.run(_counts_for_presets, tp):
        for name, built, formula, local in rows:
            assert built == formula, name
            if tp == 1:
                assert local == formula, name  # independent of the accounting code
