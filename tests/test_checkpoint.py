"""Adapter-only distributed checkpoints: resharding, exact resume, size, errors, atomicity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.dist import ProcessGroupPool
from tests.tiny_gpt import write_base

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
RANK = 4


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(4) as p:
        yield p


@pytest.fixture(scope="module")
def base_dir(pool, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("base") / "ckpt")
    pool.run(write_base, path)
    return path


def _setup(base: str, layout: tuple, preset: str = "vBuA", optimizer: str = "adam", **cfg_kwargs):
    """Model chunks on `layout` (tp, pp, vpp) with the base loaded, adapters, DDP, optimizer."""
    from tests.tiny_gpt import build_chunks, init_layout, load_base, make_optimizer, wrap_ddp
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    tp, pp, vpp = layout
    config = init_layout(tp, pp, vpp, **cfg_kwargs)
    chunks = build_chunks(config, seed=99)
    load_base(chunks, base)
    cfg = TiedLoRAConfig.preset(preset, rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
    adapters = apply_tied_lora(chunks, cfg)
    distributed = optimizer == "distopt"
    ddp = wrap_ddp(chunks, config, use_distributed_optimizer=distributed)
    # Adam: megatron-core checkpoints optimizer state for Adam only.
    opt = make_optimizer(ddp, lr=1e-2, use_distributed_optimizer=distributed)
    return config, chunks, adapters, ddp, opt


def _train(ddp, opt, config, steps: int, seed: int) -> None:
    from megatron.core import parallel_state as ps

    from tests.tiny_gpt import batches, train_step

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for s in range(steps):
        data = batches(4, seed=seed + s)
        per_rank = len(data) // dp
        train_step(ddp, opt, data[dp_rank * per_rank : (dp_rank + 1) * per_rank], config)


def _adapter_state(chunks) -> dict[str, torch.Tensor]:
    from tiedlora_megatron.inject import is_adapter_param

    return {
        f"{i}.{n}": p.detach().clone()
        for i, c in enumerate(chunks)
        for n, p in c.named_parameters()
        if is_adapter_param(n)
    }


def _reshard(base: str, ckpt: str, save_layout: tuple, load_layout: tuple) -> tuple:
    from megatron.core import parallel_state as ps

    from tests.tiny_gpt import batches, eval_losses
    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint

    eval_data = batches(4, seed=1000)
    config, chunks, adapters, ddp, opt = _setup(base, save_layout)
    try:
        _train(ddp, opt, config, steps=2, seed=50)
        saved = eval_losses(ddp, eval_data)
        save_adapter_checkpoint(ckpt, chunks, adapters, optimizer=opt, step=2)
    finally:
        ps.destroy_model_parallel()
    config, chunks, adapters, ddp, opt = _setup(base, load_layout)
    try:
        before = eval_losses(ddp, eval_data)
        meta = load_adapter_checkpoint(ckpt, chunks, adapters, optimizer=opt)
        loaded = eval_losses(ddp, eval_data)
        return saved, before, loaded, meta["step"]
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize(
    "save_layout,load_layout",
    [((2, 2, 2), (1, 1, None)), ((1, 1, None), (2, 2, 2)), ((2, 1, None), (1, 4, 2))],
    ids=["tp2pp2vpp2->tp1pp1", "tp1pp1->tp2pp2vpp2", "tp2dp2->pp4vpp2"],
)
def test_checkpoint_reshards(pool, base_dir, tmp_path, save_layout, load_layout):
    results = pool.run(_reshard, base_dir, str(tmp_path / "adapter"), save_layout, load_layout)
    saved = next(r[0] for r in results if r[0] is not None)
    for _, before, loaded, step in results:
        assert step == 2
        if loaded is not None:
            assert before != pytest.approx(saved, rel=1e-4)  # the fresh adapter differs
            assert loaded == pytest.approx(saved, rel=1e-5, abs=1e-6)


def _resume(base: str, ckpt: str, layout: tuple, optimizer: str) -> tuple[list, list]:
    """Parameters after 4 uninterrupted steps, and after 2 + save + fresh model + load + 2."""
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint

    config, chunks, adapters, ddp, opt = _setup(base, layout, optimizer=optimizer)
    try:
        _train(ddp, opt, config, steps=4, seed=70)
        straight = _adapter_state(chunks)
    finally:
        ps.destroy_model_parallel()
    config, chunks, adapters, ddp, opt = _setup(base, layout, optimizer=optimizer)
    try:
        _train(ddp, opt, config, steps=2, seed=70)
        save_adapter_checkpoint(ckpt, chunks, adapters, optimizer=opt, step=2)
    finally:
        ps.destroy_model_parallel()
    config, chunks, adapters, ddp, opt = _setup(base, layout, optimizer=optimizer)
    try:
        step = load_adapter_checkpoint(ckpt, chunks, adapters, optimizer=opt)["step"]
        _train(ddp, opt, config, steps=2, seed=70 + step)
        resumed = _adapter_state(chunks)
    finally:
        ps.destroy_model_parallel()
    return [k for k in straight if not torch.equal(straight[k], resumed[k])], sorted(straight)


@pytest.mark.parametrize(
    "layout,optimizer",
    [((2, 2, None), "adam"), ((1, 2, 2), "distopt")],
    ids=["tp2pp2-adam", "pp2vpp2dp2-distopt"],
)
def test_resume_is_bit_identical(pool, base_dir, tmp_path, layout, optimizer):
    for differing, keys in pool.run(
        _resume, base_dir, str(tmp_path / "adapter"), layout, optimizer
    ):
        assert keys and differing == []


def _size_and_errors(base: str, root: str) -> dict:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron import checkpoint as ck
    from tiedlora_megatron.checkpoint import (
        CheckpointError,
        load_adapter_checkpoint,
        save_adapter_checkpoint,
    )

    out: dict = {}
    first, second = os.path.join(root, "first"), os.path.join(root, "second")
    config, chunks, adapters, ddp, opt = _setup(base, (2, 1, None))
    try:
        _train(ddp, opt, config, steps=1, seed=5)
        save_adapter_checkpoint(first, chunks, adapters)
        out["trainable"] = adapters.num_trainable_parameters()
        out["bytes"] = sum(f.stat().st_size for f in Path(first).rglob("*") if f.is_file())
        out["tensor_bytes"] = sum(
            f.stat().st_size for f in Path(first).rglob("*.distcp") if f.is_file()
        )
        # What megatron recorded as stored: global shapes of every tensor.
        from megatron.core.dist_checkpointing import load_tensors_metadata

        stored = load_tensors_metadata(first)
        out["stored_keys"] = sorted(stored)
        out["stored_numel"] = sum(int(torch.Size(t.global_shape).numel()) for t in stored.values())
        trained = _adapter_state(chunks)
        with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
            save_adapter_checkpoint(first, chunks, adapters)
        # A save killed between the tensor files and the metadata (the last file written).
        original = ck.write_json_atomic

        def crash(*args, **kwargs):
            raise RuntimeError("simulated crash")

        ck.write_json_atomic = crash
        try:
            for target in (second, first):  # a new checkpoint, and an overwrite of one
                with pytest.raises(RuntimeError, match="simulated crash"):
                    save_adapter_checkpoint(target, chunks, adapters, overwrite=True)
        finally:
            ck.write_json_atomic = original
        partial = os.path.join(root, ".second.partial")
        with pytest.raises(CheckpointError, match="not a complete Tied-LoRA checkpoint"):
            load_adapter_checkpoint(partial, chunks, adapters)
        with pytest.raises(CheckpointError, match="no such checkpoint directory"):
            load_adapter_checkpoint(second, chunks, adapters)
        with pytest.raises(CheckpointError, match="holds no optimizer state"):
            load_adapter_checkpoint(first, chunks, adapters, optimizer=opt)
    finally:
        ps.destroy_model_parallel()

    # The previous checkpoint survived both crashes and loads into a fresh model.
    config, chunks, adapters, ddp, opt = _setup(base, (2, 1, None))
    try:
        load_adapter_checkpoint(first, chunks, adapters)
        out["reloaded_equal"] = all(
            torch.equal(v, _adapter_state(chunks)[k]) for k, v in trained.items()
        )
    finally:
        ps.destroy_model_parallel()

    messages = {}
    for name, kwargs in {
        "factors": dict(preset="lora"),
        "rank": dict(rank=8),
        "targets": dict(targets=["linear_qkv"]),
        "num_layers": dict(num_layers=4),
    }.items():
        chunks, adapters = _adapted_model((2, 1, None), **kwargs)
        try:
            with pytest.raises(CheckpointError) as info:
                load_adapter_checkpoint(first, chunks, adapters)
            messages[name] = str(info.value)
        finally:
            ps.destroy_model_parallel()
    out["messages"] = messages

    if torch.distributed.get_rank() == 0:
        meta_file = Path(first) / ck.METADATA_FILE
        meta_file.write_text(meta_file.read_text()[:-20])
    torch.distributed.barrier()
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        ck.read_metadata(first)
    return out


def _adapted_model(layout: tuple, preset="vBuA", rank=RANK, targets=TARGETS, **config_kwargs):
    """A model with adapters and no base weights loaded (enough to check compatibility)."""
    from tests.tiny_gpt import build_chunks, init_layout
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    chunks = build_chunks(init_layout(*layout, **config_kwargs))
    cfg = TiedLoRAConfig.preset(preset, rank=rank, alpha=2 * RANK, target_modules=targets)
    return chunks, apply_tied_lora(chunks, cfg)


def test_size_errors_and_interrupted_saves(pool, base_dir, tmp_path):
    results = pool.run(_size_and_errors, base_dir, str(tmp_path))
    r = results[0]
    # Only adapter tensors, each stored once: their global sizes add up to the trainable count
    # (vBuA trains every factor). Small tensors carry torch DCP's per-item headers on disk.
    print(
        f"\nadapter checkpoint: {r['bytes']:,} bytes on disk, {r['tensor_bytes']:,} in tensor "
        f"files, for {r['trainable']:,} trainable parameters ({4 * r['trainable']:,} fp32 bytes)"
    )
    assert r["stored_numel"] == r["trainable"]
    assert all("_adapter." in k or k.startswith("tied_adapter.") for k in r["stored_keys"]), r[
        "stored_keys"
    ]
    assert r["tensor_bytes"] >= 4 * r["trainable"]
    assert all(x["reloaded_equal"] for x in results)
    msgs = r["messages"]
    assert (
        "factors: checkpoint 'vBuA', model 'BA'" in msgs["factors"] and "tied:" in msgs["factors"]
    )
    assert "rank: checkpoint 4, model 8" in msgs["rank"]
    assert "target_modules: checkpoint ['linear_qkv'" in msgs["targets"]
    assert "model num_layers: checkpoint 8, model 4" in msgs["num_layers"]
