"""Verified checkpoint loads: the metadata lists every stored tensor with its global shape and a
content digest; a checkpoint whose metadata, index or data disagree is refused, naming what.

Two gloo ranks save a trained adapter at TP = 2 and reload it at TP = 1 (DP = 2); this process
tampers with copies of the checkpoint and checks `verify_adapter_checkpoint` on them, and the
ranks check that `load_adapter_checkpoint` refuses them before changing a parameter.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from tests.dist import ProcessGroupPool

TARGETS = ["linear_qkv", "linear_fc2"]
RANK = 4


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(2) as p:
        yield p


def _adapted(layout: tuple, base: str | None = None, config=None):
    from tests.tiny_gpt import build_chunks, init_layout, load_base
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    gpt_config = init_layout(*layout)
    chunks = build_chunks(gpt_config, seed=99)
    if base is not None:
        load_base(chunks, base)
    cfg = config or TiedLoRAConfig.preset("vBuA", rank=RANK, alpha=8, target_modules=TARGETS)
    return gpt_config, chunks, apply_tied_lora(chunks, cfg)


def _save_and_reload(root: str) -> dict:
    """Train at TP 2 and save (with Adam state); reload at TP 1 and save again."""
    from megatron.core import parallel_state as ps

    from tests.tiny_gpt import batches, make_optimizer, save_base, train_step, wrap_ddp
    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
    from tiedlora_megatron.full_state import full_state_dict

    base = f"{root}/base"
    config, chunks, _ = _adapted((1, 1, None))
    save_base(chunks[0], base)
    ps.destroy_model_parallel()
    out: dict = {}
    config, chunks, adapters = _adapted((2, 1, None), base)
    try:
        ddp = wrap_ddp(chunks, config)
        opt = make_optimizer(ddp, lr=1e-2)
        train_step(ddp, opt, batches(2, seed=3), config)
        save_adapter_checkpoint(f"{root}/tp2", chunks, adapters, optimizer=opt, step=1)
        saved = full_state_dict(adapters)
    finally:
        ps.destroy_model_parallel()
    config, chunks, adapters = _adapted((1, 1, None), base)
    try:
        before = full_state_dict(adapters)
        out["step"] = load_adapter_checkpoint(f"{root}/tp2", chunks, adapters)["step"]
        loaded = full_state_dict(adapters)
        out["changed"] = [k for k in saved if not torch.equal(before[k], saved[k])]
        out["differs"] = [k for k in saved if not torch.equal(loaded[k], saved[k])]
        save_adapter_checkpoint(f"{root}/tp1", chunks, adapters, step=1)
    finally:
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def saved(pool, tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("verify")
    return root, pool.run(_save_and_reload, str(root))


def _copy(root: Path, name: str) -> Path:
    dst = root / "tampered" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root / "tp2", dst)
    return dst


def _edit_meta(ckpt: Path, edit) -> None:
    meta_file = ckpt / "tiedlora.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


def _stored_tensor(ckpt: Path, key: str) -> torch.Tensor:
    from tiedlora_megatron.stored import load_stored, read_index

    return load_stored(ckpt, read_index(ckpt))[key]


def _refusal(ckpt: Path) -> str:
    from tiedlora_megatron.checkpoint import CheckpointError, verify_adapter_checkpoint

    with pytest.raises(CheckpointError) as info:
        verify_adapter_checkpoint(ckpt)
    return str(info.value)


def test_clean_tp2_checkpoint_loads_at_tp1_with_layout_free_digests(saved):
    from tiedlora_megatron.checkpoint import verify_adapter_checkpoint

    root, results = saved
    for r in results:
        assert r["step"] == 1 and r["changed"] and r["differs"] == []
    tp2, tp1 = verify_adapter_checkpoint(root / "tp2"), verify_adapter_checkpoint(root / "tp1")
    assert tp2["format_version"] == 2
    adapter = {k: v for k, v in tp2["tensors"].items() if not k.startswith("optimizer.")}
    assert {k for k in tp2["tensors"] if k.startswith("optimizer.")}  # Adam state listed too
    # The same adapter saved at TP 2 and at TP 1 (DP 2): the same list, shapes and digests.
    assert adapter == tp1["tensors"] and len(adapter) == 2 * 2 * len(TARGETS)
    assert all(len(v["sha256"]) == 64 and v["shape"] for v in adapter.values())
    assert set(tp2["files"]) == {"common.pt", "metadata.json"}


def test_metadata_naming_fewer_targets_or_factors_is_refused(saved):
    root, _ = saved
    targets = _copy(root, "targets")
    _edit_meta(targets, lambda m: m["adapter_config"].update(target_modules=["linear_qkv"]))
    message = _refusal(targets)
    assert "failed verification" in message and str(targets) in message
    for key in ("tied_adapter.linear_fc2.A", "decoder.layers.mlp.linear_fc2_adapter.v"):
        assert f"stored tensor '{key}': target 'linear_fc2' is not in the metadata" in message

    factors = _copy(root, "factors")
    _edit_meta(factors, lambda m: m["adapter_config"].update(factors="vBA"))
    message = _refusal(factors)
    assert "'decoder.layers.self_attention.linear_qkv_adapter.u': factor 'u'" in message

    # The list itself edited: a stored tensor left out, and one listed that is not stored.
    listing = _copy(root, "listing")

    def edit(meta):
        meta["tensors"]["decoder.layers.mlp.linear_fc2_adapter.extra"] = {
            **meta["tensors"].pop("tied_adapter.linear_fc2.B")
        }

    _edit_meta(listing, edit)
    message = _refusal(listing)
    assert "stored tensor 'tied_adapter.linear_fc2.B' is not listed in tiedlora.json" in message
    assert "listed tensor 'decoder.layers.mlp.linear_fc2_adapter.extra' is not stored" in message

    unlisted = _copy(root, "unlisted")  # format 2 with its list removed: not taken for format 1
    _edit_meta(unlisted, lambda m: m.pop("tensors"))
    assert "tiedlora.json of format 2 lacks its list of tensors" in _refusal(unlisted)


def test_truncated_or_missing_data_file_is_refused(saved):
    root, _ = saved
    truncated = _copy(root, "truncated")
    data = max(truncated.glob("*.distcp"), key=lambda f: f.stat().st_size)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 64)
    message = _refusal(truncated)
    assert f"{data}: truncated data file ({size - 64} bytes, the index needs {size}" in message

    missing = _copy(root, "missing")
    next(missing.glob("*.distcp")).unlink()
    assert "missing data file" in _refusal(missing)

    index = _copy(root, "index")
    (index / ".metadata").write_bytes((index / ".metadata").read_bytes()[:100])
    assert "unreadable tensor index" in _refusal(index)


def test_flipped_byte_is_caught_by_the_digest(saved):
    root, _ = saved
    key = "tied_adapter.linear_qkv.A"  # replicated over TP: stored as one chunk
    flipped = _copy(root, "flipped")
    raw = _stored_tensor(flipped, key).numpy().tobytes()
    hits = [f for f in flipped.glob("*.distcp") if raw in f.read_bytes()]
    assert len(hits) == 1
    data = bytearray(hits[0].read_bytes())
    data[data.index(raw) + 17] ^= 0x04  # inside the tensor's values: still a valid file
    hits[0].write_bytes(bytes(data))
    message = _refusal(flipped)
    assert f"'{key}': content digest mismatch" in message

    common = _copy(root, "common")
    (common / "common.pt").write_bytes((common / "common.pt").read_bytes() + b"\0")
    assert "common.pt: missing, or its digest differs" in _refusal(common)


def test_format1_checkpoint_verifies_with_a_warning(saved):
    from tiedlora_megatron.checkpoint import verify_adapter_checkpoint

    root, _ = saved
    old = _copy(root, "format1")

    def downgrade(meta):
        for k in ("tensors", "objects", "files"):
            meta.pop(k)
        meta["format_version"] = 1

    _edit_meta(old, downgrade)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = verify_adapter_checkpoint(old)
    assert meta["format_version"] == 1
    assert any("format-1 checkpoint without a list" in str(w.message) for w in caught)
    _edit_meta(old, lambda m: m["adapter_config"].update(target_modules=["linear_fc2"]))
    assert "target 'linear_qkv' is not in the metadata" in _refusal(old)  # still checked


def _load_tampered(root: str) -> dict:
    """Load each tampered copy the way eval / export do (adapters built from its metadata)."""
    from megatron.core import parallel_state as ps

    from tiedlora_megatron import TiedLoRAConfig
    from tiedlora_megatron.checkpoint import (
        CheckpointError,
        load_adapter_checkpoint,
        read_metadata,
    )
    from tiedlora_megatron.full_state import full_state_dict

    out = {}
    for name in ("targets", "flipped", "truncated", "format1"):
        ckpt = f"{root}/tampered/{name}"
        config = TiedLoRAConfig.from_dict(read_metadata(ckpt)["adapter_config"])
        _, chunks, adapters = _adapted((2, 1, None), f"{root}/base", config)
        try:
            before = full_state_dict(adapters)
            try:
                load_adapter_checkpoint(ckpt, chunks, adapters)
                out[name] = None
            except CheckpointError as e:
                out[name] = str(e)
            after = full_state_dict(adapters)
            out[f"{name}_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        finally:
            ps.destroy_model_parallel()
    return out


def test_load_refuses_tampered_checkpoints_on_every_rank(pool, saved):
    root, _ = saved
    for r in pool.run(_load_tampered, str(root)):
        assert "tied_adapter.linear_fc2.A" in r["targets"] and r["targets_unchanged"]
        assert "content digest mismatch" in r["flipped"] and r["flipped_unchanged"]
        assert "truncated data file" in r["truncated"] and r["truncated_unchanged"]
        # format 1 with targets edited to fc2 only: refused, naming the qkv tensors
        assert "decoder.layers.self_attention.linear_qkv_adapter.u" in r["format1"]


def test_model_check_names_missing_unexpected_and_wrong_shapes():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from tiedlora_megatron.checkpoint import _model_problems

    def sharded(key, shape):
        return ShardedTensor.from_rank_offsets(key, torch.zeros(shape))

    model = {"model0": {"a": sharded("x.u", (8, 4)), "b": sharded("x.v", (8, 64))}}
    stored = {"x.u": torch.zeros(8, 4), "x.v": torch.zeros(8, 32), "y.u": torch.zeros(8, 4)}
    stored["optimizer.state.exp_avg.z"] = torch.zeros(1)  # optimizer state is not the model's
    problems = _model_problems(model, stored)
    assert problems == [
        "unexpected: stored 'y.u' has no place in the model",
        "wrong shape: 'x.v' stored (8, 32), model (8, 64)",
    ]
    assert _model_problems(model, {"x.u": torch.zeros(8, 4)}) == [
        "missing: 'x.v' (shape (8, 64)) is not stored"
    ]
