"""Tied-LoRA on megatron-core's MoE layers (experts.py) against a dense reference.

The reference is independent of the adapters' code: the same base model with every adapted
weight replaced by W + s·diag(v)·B·diag(u)·A, built with torch ops from leaf tensors holding the
adapter's full factors (`full_state_dict` keys). Its losses must equal the adapted model's, and
autograd's gradients of those leaves must equal every factor's gradient: in one process at
EP = 1 / TP = 1, and at EP 1/2 x TP 1/2 (sequence parallel) with expert TP 1 or TP, under
megatron's DDP and finalize_model_grads, with both token dispatchers and gated (SwiGLU) experts.
Three optimizer steps with the distributed optimizer are checked against torch's Adam on the
leaves, and a checkpoint saved at EP 2 (ETP 1 or 2) loads at EP 1 with the same factors and
losses.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.dist import ProcessGroupPool
from tests.tiny_moe import copy_ep1_weights, moe_batch, moe_config, moe_gpt, token_losses

WORLD = 4
TARGETS = ["linear_qkv", "experts.linear_fc1", "experts.linear_fc2", "shared_experts.linear_fc1"]
#: name -> (preset, overrides): per-expert LoRA, tied across experts and layers, a pair per expert
ADAPTERS = {
    "lora": ("lora", {}),
    "vBuA": ("vBuA", {}),
    "vBuA-per-expert": ("vBuA", {"tie_experts": False}),
}
RANK = 4


@pytest.fixture(scope="module")
def pool():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessGroupPool(WORLD) as p:
        yield p


def _adapter_config(name: str):
    from tiedlora_megatron import TiedLoRAConfig

    preset, overrides = ADAPTERS[name]
    return TiedLoRAConfig.preset(
        preset, rank=RANK, alpha=2 * RANK, target_modules=TARGETS, **overrides
    )


def _random_state(adapters) -> dict[str, torch.Tensor]:
    """The adapters' full state with every factor random (ΔW != 0), the same on every rank."""
    g = torch.Generator().manual_seed(5)
    return {
        k: torch.randn(v.shape, generator=g) * 0.3 + (1.0 if k[-1] in "uv" else 0.0)
        for k, v in adapters.full_state_dict().items()
    }


# -- the dense reference -------------------------------------------------------------------------

_WEIGHT = re.compile(
    r"^decoder\.layers\.(\d+)\.(?:self_attention|mlp)\.(?:(shared_experts|experts)\."
    r"(?:local_experts\.(\d+)\.)?)?(linear_\w+)\.weight$"
)


def _delta(leaves: dict[str, torch.Tensor], layer: int, kind: str, scaling: float):
    """s·diag(v)·B·diag(u)·A of one adapted weight from the full-state leaves."""

    def factor(f: str) -> torch.Tensor | None:
        for key in (f"layers.{layer}.{kind}.{f}", f"tied.{kind}.{f}"):
            if key in leaves:
                return leaves[key]
        tied_all = re.sub(r"experts\.\d+\.", "experts.", kind)
        return leaves.get(f"tied.{tied_all}.{f}")

    a, b, u, v = (factor(f) for f in "ABuv")
    if u is not None:
        a = u[:, None] * a
    if v is not None:
        b = v[:, None] * b
    return scaling * b @ a


def _merged_losses(model, leaves, scaling, batch) -> torch.Tensor:
    """Token losses of the base model (adapters detached) with W + ΔW in every adapted weight."""
    weights = {}
    for name, w in model.named_parameters():
        m = _WEIGHT.match(name)
        if m is None:
            continue
        layer, part, expert, attr = m.groups()
        kind = attr if part is None else f"{part}.{attr}" if expert is None else (
            f"{part}.{expert}.{attr}"
        )  # fmt: skip
        if any(k.startswith((f"layers.{layer}.{kind}.", f"tied.{kind}.")) for k in leaves) or (
            expert is not None and f"tied.{part}.{attr}.A" in leaves
        ):
            weights[name] = w.detach() + _delta(leaves, int(layer), kind, scaling)
    assert weights, "no adapted weight found"
    return torch.func.functional_call(model, weights, (), _call_kwargs(batch), strict=False)


def _call_kwargs(batch):
    from tests.tiny_moe import MBS, SEQ

    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    return dict(
        input_ids=batch["tokens"], position_ids=positions, attention_mask=None,
        labels=batch["labels"],
    )  # fmt: skip


def _reference(name: str, dispatcher: str, batches: list, gated: bool = False):
    """(state, per-batch adapted losses, leaf grads of the mean loss, merged losses) at EP 1 /
    TP 1 on this rank alone; checks the adapted model against the merged one on the way."""
    from tiedlora_megatron import apply_tied_lora

    model = moe_gpt(moe_config(dispatcher=dispatcher, shared_expert=True, gated=gated))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = apply_tied_lora(model, _adapter_config(name))
    state = _random_state(adapters)
    adapters.load_full_state_dict(state)
    losses = [token_losses(model, b) for b in batches]
    torch.stack([t.mean() for t in losses]).mean().backward()
    grads = {k: p.grad for k, p in adapters.named_parameters()}
    adapters.detach()
    leaves = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    merged = [_merged_losses(model, leaves, adapters.config.scaling, b) for b in batches]
    torch.stack([t.mean() for t in merged]).mean().backward()
    for got, want in zip(losses, merged, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    leaf_grads = {k: v.grad for k, v in leaves.items()}
    by_key = _param_keys(adapters)
    for pname, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(grad, leaf_grads[by_key[pname]], rtol=1e-4, atol=1e-6)
    assert sum(g is not None for g in grads.values()) == len(adapters.full_state_dict())
    return state, weights, [t.detach() for t in losses], leaf_grads


def _param_keys(adapters) -> dict[str, str]:
    """Parameter name (as `adapters.named_parameters`) -> its full-state key."""
    from tiedlora_megatron.full_state import _local_entries

    ids = {id(p): key for key, e in _local_entries(adapters).items() for p in e.params}
    return {n: ids[id(p)] for n, p in adapters.named_parameters()}


# -- layouts under test --------------------------------------------------------------------------


def _layout_model(
    tp: int, ep: int, weights: dict, dispatcher: str = "alltoall", etp: int = 1, gated=False
):
    """(config, model) at TP x EP x expert TP (SP with TP) holding the EP 1 model's weights."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )  # fmt: skip
    config = moe_config(tp, ep, tp > 1, dispatcher, etp=etp, shared_expert=True, gated=gated)
    gpt = moe_gpt(config)
    copy_ep1_weights(gpt, weights)
    return config, gpt


def _layout_matches(name: str, tp: int, ep: int, dispatcher: str, etp: int, gated: bool) -> int:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from tiedlora_megatron import apply_tied_lora
    from tiedlora_megatron.full_state import _local_entries, local_shard
    from tiedlora_megatron.params import ModelDims, count_trainable_parameters

    dp = torch.distributed.get_world_size() // tp
    batches = [moe_batch(i) for i in range(dp)]
    ps.initialize_model_parallel()
    try:
        state, weights, ref_losses, ref_grads = _reference(name, dispatcher, batches, gated)
    finally:
        ps.destroy_model_parallel()

    config, gpt = _layout_model(tp, ep, weights, dispatcher, etp, gated)
    try:
        adapters = apply_tied_lora(gpt, _adapter_config(name))
        adapters.load_full_state_dict(state)
        model = DistributedDataParallel(
            config=config, ddp_config=DistributedDataParallelConfig(), module=gpt
        )
        dp_rank = ps.get_data_parallel_rank()
        losses = token_losses(model, batches[dp_rank])
        torch.testing.assert_close(losses, ref_losses[dp_rank], rtol=1e-5, atol=1e-5)
        losses.mean().backward()
        finalize_model_grads([model])
        dims = ModelDims.from_transformer_config(config)
        assert adapters.num_trainable_parameters() == count_trainable_parameters(
            adapters.config, dims
        )
        checked = 0
        for key, entry in _local_entries(adapters).items():
            for p in entry.params:
                want = ref_grads[key]
                want = want if entry.dim is None else local_shard(want, entry.layout, entry.dim)
                torch.testing.assert_close(p.main_grad, want, rtol=1e-4, atol=1e-6, msg=key)
                checked += 1
        return checked
    finally:
        ps.destroy_model_parallel()


#: (adapter, tp, ep, dispatcher, expert tp, gated experts)
LAYOUTS = [
    *[(name, 1, 2, "alltoall", 1, False) for name in ADAPTERS],
    *[(name, 2, 2, "alltoall", 1, False) for name in ("lora", "vBuA")],
    ("vBuA", 2, 2, "allgather", 1, False),
    # EP 1 at TP 2: an expert's replicas on the two TP ranks see different tokens
    *[(name, 2, 1, "alltoall", 1, False) for name in ("lora", "vBuA")],
    # expert TP = TP: experts sharded, the dispatcher communicates, partial factor gradients
    *[(name, 2, 2, "alltoall", 2, False) for name in ("lora", "vBuA")],
    ("vBuA", 2, 2, "allgather", 2, True),
    ("vBuA-per-expert", 2, 1, "alltoall", 2, True),
]


@pytest.mark.parametrize(
    ("name", "tp", "ep", "dispatcher", "etp", "gated"),
    LAYOUTS,
    ids=[
        f"{n}-tp{tp}-ep{ep}-etp{etp}-{d}{'-gated' if g else ''}" for n, tp, ep, d, etp, g in LAYOUTS
    ],
)
def test_layout_matches_dense_reference(pool, name, tp, ep, dispatcher, etp, gated):
    checked = pool.run(_layout_matches, name, tp, ep, dispatcher, etp, gated)
    assert all(c > 0 for c in checked)


# -- optimizer steps and a checkpoint across EP ---------------------------------------------------

STEPS, LR, CLIP = 3, 1e-2, 0.05
EPS = 1e-2  # above most gradient entries: keeps Adam's update close to linear in them


def _reference_steps(name: str, batches: list) -> tuple[dict, dict, dict]:
    """(start state, base weights, state after STEPS of torch's AdamW on the merged model's
    leaves over the mean loss of `batches`), at EP 1 / TP 1 on this rank alone."""
    from tiedlora_megatron import apply_tied_lora

    model = moe_gpt(moe_config(shared_expert=True))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = apply_tied_lora(model, _adapter_config(name))
    state = _random_state(adapters)
    trained = {k for k, p in _keyed_params(adapters).items() if p.requires_grad}
    adapters.detach()
    leaves = {k: v.clone().requires_grad_(k in trained) for k, v in state.items()}
    params, norms = [leaves[k] for k in sorted(trained)], []
    opt = torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0)
    for _ in range(STEPS):
        opt.zero_grad()
        merged = [_merged_losses(model, leaves, adapters.config.scaling, b) for b in batches]
        torch.stack([t.mean() for t in merged]).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        norms.append(float(norm))
        assert norm > CLIP
        opt.step()
    return state, weights, {k: v.detach() for k, v in leaves.items()}, norms


def _keyed_params(adapters) -> dict[str, torch.nn.Parameter]:
    keys = _param_keys(adapters)
    return {keys[n]: p for n, p in adapters.named_parameters()}


def _steps_then_ep1(name: str, ckpt: str, distopt: bool, etp: int) -> int:
    """STEPS at TP 2 x EP 2 x expert TP `etp` (megatron's optimizer, distributed or not,
    clipping the gradient norm) equal the reference; the checkpoint saved there loads at EP 1 /
    TP 1 (data parallel 4) with the same factors and losses."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from tests.tiny_gpt import make_optimizer, wrap_ddp
    from tiedlora_megatron import apply_tied_lora
    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint

    tp, ep = 2, 2
    batches = [moe_batch(i) for i in range(torch.distributed.get_world_size() // tp)]
    ps.initialize_model_parallel()
    try:
        state, weights, want, want_norms = _reference_steps(name, batches)
    finally:
        ps.destroy_model_parallel()

    config, gpt = _layout_model(tp, ep, weights, etp=etp)
    try:
        adapters = apply_tied_lora(gpt, _adapter_config(name))
        adapters.load_full_state_dict(state)
        ddp = wrap_ddp([gpt], config, use_distributed_optimizer=distopt)
        optimizer = make_optimizer(
            ddp, lr=LR, optimizer="adam", adam_eps=EPS, clip_grad=CLIP,
            use_distributed_optimizer=distopt,
        )  # fmt: skip
        batch = batches[ps.get_data_parallel_rank()]
        norms = []
        for _ in range(STEPS):
            ddp[0].zero_grad_buffer()
            optimizer.zero_grad()
            token_losses(ddp[0], batch).mean().backward()
            finalize_model_grads(ddp)
            norms.append(float(optimizer.step()[1]))
        # clipping acted in every step (the reference asserts it), so a factor counted twice
        # or missed in megatron's grad norm would show here and in the parameters
        torch.testing.assert_close(norms, want_norms, rtol=1e-4, atol=0)
        got = adapters.full_state_dict()
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-5, msg=key)
        with torch.no_grad():
            losses = token_losses(gpt, batch)
        save_adapter_checkpoint(ckpt, [gpt], adapters, step=STEPS)
    finally:
        ps.destroy_model_parallel()

    ps.initialize_model_parallel()
    try:
        gpt = moe_gpt(moe_config(shared_expert=True))
        adapters = apply_tied_lora(gpt, _adapter_config(name))
        load_adapter_checkpoint(ckpt, [gpt], adapters)
        loaded = adapters.full_state_dict()
        for key in got:
            torch.testing.assert_close(loaded[key], got[key], rtol=0, atol=0, msg=key)
        if torch.distributed.get_rank() < tp:  # the ranks that ran batches[0] at TP 2
            with torch.no_grad():
                torch.testing.assert_close(token_losses(gpt, batches[0]), losses)
        return len(loaded)
    finally:
        ps.destroy_model_parallel()


STEP_CASES = [
    ("lora", True, 2), ("vBuA", True, 1), ("vBuA-per-expert", True, 2), ("vBuA", False, 2),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "distopt", "etp"),
    STEP_CASES,
    ids=[f"{n}-{'distopt' if d else 'plain'}-etp{e}" for n, d, e in STEP_CASES],
)
def test_optimizer_steps_and_checkpoint_at_ep1(pool, tmp_path, name, distopt, etp):
    counts = pool.run(_steps_then_ep1, name, str(tmp_path / "ckpt"), distopt, etp)
    assert len(set(counts)) == 1 and counts[0] > 0


# -- what is refused --------------------------------------------------------------------------------


def _refusals() -> list[str]:
    """The error message of each unsupported MoE set-up, on every rank."""
    from megatron.core import parallel_state as ps

    from tiedlora_megatron import ConfigError, TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.layouts import UnsupportedLayerError

    messages = []
    ps.initialize_model_parallel(expert_model_parallel_size=2, expert_tensor_parallel_size=2)
    try:  # expert TP 2 beside dense TP 1
        gpt = moe_gpt(moe_config(1, 2, etp=2, shared_expert=True))
        with pytest.raises(UnsupportedLayerError) as e:
            apply_tied_lora(gpt, _adapter_config("vBuA"))
        messages.append(str(e.value))
    finally:
        ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    try:
        gpt = moe_gpt(moe_config())
        for targets in (["linear_fc1"], ["shared_experts.linear_fc2"]):
            with pytest.raises(ConfigError) as e:
                apply_tied_lora(gpt, TiedLoRAConfig(target_modules=targets))
            messages.append(str(e.value))
    finally:
        ps.destroy_model_parallel()
    return messages


def test_unsupported_moe_setups_are_refused_by_name(pool):
    from tiedlora_megatron import ConfigError, TiedLoRAConfig

    etp, dense, shared = pool.run(_refusals)[0]
    assert "expert_tensor_parallel_size=1 or equal to tensor_model_parallel_size (1), not 2" in etp
    assert "'linear_fc1' matched no module" in dense and "experts.linear_fc1" in dense
    assert "'shared_experts.linear_fc2' matched no module" in shared
    with pytest.raises(ConfigError, match="tie_experts=True needs tied=True"):
        TiedLoRAConfig.preset("lora", tie_experts=True)


def test_grouped_gemm_experts_are_refused_naming_sequential_mlp():
    from tiedlora_megatron.experts import check_experts_module
    from tiedlora_megatron.layouts import UnsupportedLayerError

    class TEGroupedMLP(torch.nn.Module):  # megatron's class name; its GEMM needs TE
        pass

    with pytest.raises(UnsupportedLayerError, match="moe_grouped_gemm=False"):
        check_experts_module("decoder.layers.0.mlp.experts", TEGroupedMLP())
    check_experts_module("decoder.layers.0.mlp.shared_experts", TEGroupedMLP())


def test_chunks_with_different_tied_factors_are_refused():
    """MoE layers on some pipeline chunks only: their tied factors could not be summed."""
    from tiedlora_megatron import ConfigError
    from tiedlora_megatron.factors import TiedFactorBank
    from tiedlora_megatron.pipeline import _check_same_factors

    def bank(*keys: str) -> TiedFactorBank:
        out = TiedFactorBank()
        for key in keys:
            pair = torch.nn.Module()
            pair.A = torch.nn.Parameter(torch.zeros(2, 3))
            out[key] = pair
        return out

    _check_same_factors([bank("linear_qkv"), bank("linear_qkv")], None)
    with pytest.raises(ConfigError, match="MoE layers on every stage"):
        _check_same_factors([bank("linear_qkv", "experts_linear_fc1"), bank("linear_qkv")], None)
