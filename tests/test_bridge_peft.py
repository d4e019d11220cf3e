"""`TiedLoRA`, the Megatron-Bridge / NeMo 2 PEFT, against the plain API on a tiny megatron GPT.

- Called through the PEFT protocol (`peft(chunks, training=True)`), at TP=1 and TP=2, it gives
  bit-identical trainable parameters (names, shapes, values), forward outputs and gradients to
  `apply_tied_lora` with the equivalent TiedLoRAConfig on an identical model; `transform` over
  the adapted model returns every module unchanged.
- `adapter_key_filter` keeps exactly the adapter keys of state dicts and sharded state dicts
  (frozen tied factors included) and no base key, under wrapper prefixes too.
- The example YAML instantiates (as hydra / Megatron-Bridge do with `_target_`) to the config of
  the example recipe; typos and bad values are errors naming the field.
- A second call on the same model is a no-op when it repeats the first and refused otherwise;
  Float16Module is unwrapped, DDP refused; replicated tied factors get their gradient sum
  under megatron-core's own finalize function set by the trainer; adapters can be disabled and re-enabled.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.dist import ProcessGroupPool
from tests.tiny_gpt import batches, build_gpt, gpt_config, wrap_ddp
from tiedlora_megatron.config import ConfigError, TiedLoRAConfig
from tiedlora_megatron.integrations.bridge import TiedLoRA

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(2) as p:
        yield p


def _forward_backward(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens, labels = batches(1, seed=3)[0]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    out = model(tokens, positions, None, labels=labels)
    out.float().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def _perturb(model) -> None:
    """The same non-zero trained factors on every copy (ΔW = 0 at the start would hide them)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            if p.requires_grad:
                g = torch.Generator().manual_seed(100 + i)
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- equivalence with apply_tied_lora -------------------------------------------------------


def _equivalence(tp: int) -> list[tuple[str, int]]:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron import apply_tied_lora

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        rows = []
        for preset in ("vBuA", "lora", "vera"):
            config = gpt_config(tp=tp)
            via_peft, plain = build_gpt(config, seed=7), build_gpt(config, seed=7)
            peft = TiedLoRA(preset=preset, dim=4, alpha=8, target_modules=TARGETS)
            chunks = [via_peft]
            assert peft(chunks, training=True) is chunks
            peft.set_params_to_save(chunks)
            cfg = TiedLoRAConfig.preset(preset, rank=4, alpha=8, target_modules=TARGETS)
            handle = apply_tied_lora([plain], cfg)
            assert peft.adapters.config == cfg

            def trainable(m):
                return {n: p for n, p in m.named_parameters() if p.requires_grad}

            a, b = trainable(via_peft), trainable(plain)
            assert list(a) == list(b) and a, preset
            assert all(a[n].shape == b[n].shape and torch.equal(a[n], b[n]) for n in a), preset
            sa, sb = via_peft.state_dict(), plain.state_dict()
            assert list(sa) == list(sb)
            assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
            assert peft.adapters.num_trainable_parameters() == handle.num_trainable_parameters()

            _perturb(via_peft)
            _perturb(plain)
            out_a, grads_a = _forward_backward(via_peft)
            out_b, grads_b = _forward_backward(plain)
            assert torch.equal(out_a, out_b), preset
            assert list(grads_a) == list(grads_b)
            assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a), preset
            assert any(g.abs().sum() > 0 for g in grads_a.values())

            # Bridge's walk calls transform(module, name=<attribute>, prefix=<parent path>).
            for path, module in via_peft.named_modules():
                prefix, _, name = path.rpartition(".")
                assert peft.transform(module, name=name, prefix=prefix) is module
            assert via_peft.training
            rows.append((preset, len(a)))
        return rows
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("tp", [1, 2])
def test_protocol_equals_apply_tied_lora(pool, tp):
    for rows in pool.run(_equivalence, tp):
        # 2 layers x 4 targets: u, v each (tied: + one A, B per kind; lora: A, B per layer).
        assert dict(rows) == {"vBuA": 2 * 4 * 2 + 4 * 2, "lora": 2 * 4 * 2, "vera": 2 * 4 * 2}


# -- checkpoint keys ------------------------------------------------------------------------


def _selected_keys() -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.inject import is_adapter_param

    ps.initialize_model_parallel()
    try:
        config = gpt_config()
        base_keys = set(build_gpt(config).state_dict())
        model = build_gpt(config)
        # VeRA: the tied A and B are frozen, and still part of the adapter.
        peft = TiedLoRA(preset="vera", dim=4, target_modules=TARGETS)
        peft([model])
        peft.set_params_to_save([model])
        out = {}
        for kind, keys in (
            ("state_dict", list(model.state_dict())),
            ("sharded", list(model.sharded_state_dict())),
        ):
            selected = {k for k in keys if peft.adapter_key_filter(k)}
            assert selected == {k for k in keys if is_adapter_param(k)}, kind
            assert not selected & base_keys, kind
            assert set(keys) - selected <= base_keys, kind
            out[kind] = sorted(selected)
        named = dict(model.named_parameters())
        out["params_to_save"] = sorted(peft.params_to_save)
        out["adapter_params"] = sorted(n for n in named if is_adapter_param(n))
        out["frozen_saved"] = sorted(n for n in peft.params_to_save if not named[n].requires_grad)
        # Under a wrapper prefix (DDP's `module.`) and as Bridge's (name, parameter) pairs.
        out["prefixed"] = [peft.adapter_key_filter("module." + k) for k in out["state_dict"]]
        out["pairs"] = [peft.adapter_key_filter((n, p)) for n, p in named.items()]
        out["pairs_expected"] = [is_adapter_param(n) for n in named]
        return out
    finally:
        ps.destroy_model_parallel()


def test_adapter_key_filter_selects_exactly_the_adapters(pool):
    out = pool.run(_selected_keys)[0]
    assert "tied_adapter.linear_qkv.A" in out["state_dict"]
    assert "decoder.layers.0.self_attention.linear_qkv_adapter.u" in out["state_dict"]
    assert "decoder.layers.1.mlp.linear_fc2_adapter.v" in out["state_dict"]
    assert len(out["state_dict"]) == 4 * 2 + 2 * 4 * 2  # tied A, B per kind; u, v per layer
    assert out["sharded"] and set(out["sharded"]) <= set(out["state_dict"])
    assert out["params_to_save"] == out["adapter_params"]
    assert out["frozen_saved"] == sorted(f"tied_adapter.{k}.{m}" for k in TARGETS for m in "AB")
    assert all(out["prefixed"])
    assert out["pairs"] == out["pairs_expected"]


# -- configuration: YAML, recipe, errors ----------------------------------------------------


def _instantiate(node: dict[str, Any]) -> Any:
    """What hydra's / Megatron-Bridge's `instantiate` does with a flat `_target_` node."""
    node = dict(node)
    module, _, name = node.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(module), name)(**node)


def _example_recipe():
    spec = importlib.util.spec_from_file_location(
        "bridge_finetune_recipe", ROOT / "examples/bridge/finetune_recipe.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yaml_instantiates_to_the_recipe_config():
    node = yaml.safe_load((ROOT / "examples/bridge/tiedlora_peft.yaml").read_text())["peft"]
    peft = _instantiate(node)
    assert type(peft) is TiedLoRA
    expected = TiedLoRAConfig.preset("vBuA", rank=8, alpha=16, target_modules=["linear_qkv"])
    assert peft.to_config() == expected
    assert _example_recipe().tied_lora_peft().to_config() == expected


def test_fields_mirror_the_config():
    names = {f.name for f in dataclasses.fields(TiedLoRA)}
    assert {f.name for f in dataclasses.fields(TiedLoRAConfig)} <= names
    assert TiedLoRA().to_config() == TiedLoRAConfig()
    assert TiedLoRA(preset=None, rank=4, factors="BA", tied=False).to_config() == (
        TiedLoRAConfig.preset("lora", rank=4)
    )
    assert TiedLoRA(preset="vera").to_config().u_init == 0.1  # the preset's values survive


def test_bad_fields_are_named():
    with pytest.raises(TypeError, match="dimm"):
        TiedLoRA(dimm=8)
    node = {"_target_": "tiedlora_megatron.integrations.bridge.TiedLoRA", "alhpa": 16}
    with pytest.raises(TypeError, match="alhpa"):
        _instantiate(node)
    with pytest.raises(ConfigError, match="'linear_qvk' \\(did you mean 'linear_qkv'"):
        TiedLoRA(target_modules=["linear_qvk"])
    with pytest.raises(ConfigError, match="unknown preset 'vBau'"):
        TiedLoRA(preset="vBau")
    with pytest.raises(ConfigError, match="dropout"):
        TiedLoRA(dropout=1.5)
    with pytest.raises(ConfigError, match="dim=8 and rank=4"):
        TiedLoRA(dim=8, rank=4)
    peft = TiedLoRA()
    peft.alpha = -1  # recipes change fields after construction: checked again on every call
    with pytest.raises(ConfigError, match="alpha"):
        peft(torch.nn.Linear(2, 2))


@pytest.mark.skipif(
    importlib.util.find_spec("megatron.bridge") is not None, reason="Megatron-Bridge is installed"
)
def test_recipe_without_bridge_says_what_is_missing():
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples/bridge/finetune_recipe.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "pip install megatron-bridge" in run.stderr


# -- calling twice, wrappers ----------------------------------------------------------------


def _calls_and_wrappers() -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    ps.initialize_model_parallel()
    try:
        config = gpt_config()
        out: dict[str, Any] = {}

        model = build_gpt(config)
        peft = TiedLoRA(dim=4, target_modules=TARGETS)
        peft(model)
        params = dict(model.named_parameters())
        out["repeat_is_noop"] = peft(model) is model and dict(model.named_parameters()) == params

        def other_settings():
            peft.dim = 8
            try:
                peft(model)
            finally:
                peft.dim = 4

        for label, call in (
            ("other_training", lambda: peft(model, training=False)),
            ("other_settings", other_settings),
            ("other_instance", lambda: TiedLoRA(dim=4, target_modules=TARGETS)(model)),
        ):
            with pytest.raises(RuntimeError) as e:
                call()
            out[label] = str(e.value)
        # A target layer that the call did not adapt: transform refuses to pass it through.
        fresh = build_gpt(config)
        with pytest.raises(RuntimeError) as e:
            peft.transform(fresh.decoder.layers[0].self_attention.linear_qkv, "linear_qkv", "x")
        out["transform_unadapted"] = str(e.value)
        # A copy of the config (trainers deep-copy theirs) does not copy the model.
        clone = copy.deepcopy(peft)
        out["copy"] = clone == peft and clone._applied is None

        frozen = build_gpt(config)
        TiedLoRA(dim=4)(frozen, training=False)
        out["inference"] = (
            not frozen.training,
            sum(p.requires_grad for p in frozen.parameters()),
            sum("_adapter" in n for n, _ in frozen.named_parameters()),
        )

        half = copy.copy(config)
        half.bf16 = True
        inner = build_gpt(config)
        wrapped = Float16Module(half, inner)
        TiedLoRA(dim=4)([wrapped])
        out["float16"] = (
            "tied_adapter" in inner._modules and "tied_adapter" not in wrapped._modules,
            "tied_adapter.linear_qkv.A" in wrapped.state_dict(),
            inner.tied_adapter.linear_qkv.A.dtype == torch.bfloat16,
        )

        ddp = wrap_ddp([build_gpt(config)], config)
        with pytest.raises(TypeError) as e:
            TiedLoRA(dim=4)(ddp)
        out["ddp"] = str(e.value)
        return out
    finally:
        ps.destroy_model_parallel()


def test_second_call_wrappers_and_inference(pool):
    out = pool.run(_calls_and_wrappers)[0]
    assert out["repeat_is_noop"]
    for label in ("other_training", "other_settings"):
        assert "already has the adapters of this TiedLoRA" in out[label], out[label]
    assert "already has Tied-LoRA adapters" in out["other_instance"]
    assert "x.linear_qkv" in out["transform_unadapted"]
    assert "apply the instance to the model" in out["transform_unadapted"]
    assert out["copy"]
    assert out["inference"][:2] == (True, 0) and out["inference"][2] > 0
    assert out["float16"] == (True, True, True)
    assert "wrapped in DistributedDataParallel" in out["ddp"]


# -- tied replicas, disabling -----------------------------------------------------------------


def _forward(model) -> torch.Tensor:
    tokens, labels = batches(1, seed=4)[0]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None, labels=labels)


def _replicas_and_disabling() -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    ps.initialize_model_parallel()
    try:
        config = gpt_config()
        out: dict[str, Any] = {}

        # Two chunks: each holds a replica of the tied factors. A trainer's loop: DDP, its own
        # backward, megatron-core's finalize function set after the PEFT was applied.
        chunks = [build_gpt(config, seed=1), build_gpt(config, seed=2)]
        TiedLoRA(dim=4)(chunks)
        for c in chunks:
            _perturb(c)
        ddp = wrap_ddp(chunks, config)
        config.finalize_model_grads_func = megatron_finalize
        tokens, labels = batches(1, seed=4)[0]
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        for c in ddp:
            c.zero_grad_buffer()
        a = [c.tied_adapter.linear_qkv.A for c in chunks]
        own = []
        for c, p in zip(ddp, a, strict=True):  # each chunk's own gradient (DP ranks agree)
            c(tokens, positions, None, labels=labels).mean().backward()
            own.append(p.main_grad.clone())
        config.finalize_model_grads_func(ddp)
        out["summed"] = all(torch.allclose(p.main_grad, own[0] + own[1]) for p in a)
        out["both_nonzero"] = all(bool(g.abs().sum() > 0) for g in own)

        # One chunk, no pipeline: nothing to sum, nothing wrapped.
        single = build_gpt(config)
        peft = TiedLoRA(dim=4, target_modules=TARGETS)
        peft(single)
        base = _forward(single)
        _perturb(single)
        adapted = _forward(single)
        peft.disable_adapter_layers(single)
        out["disabled_is_base"] = torch.equal(_forward(single), base)
        peft.enable_adapter_layers(single)
        out["enabled_again"] = torch.equal(_forward(single), adapted)
        out["adapted_differs"] = not torch.equal(adapted, base)
        return out
    finally:
        ps.destroy_model_parallel()


def test_replicas_sum_under_megatron_finalize_and_disabling(pool):
    out = pool.run(_replicas_and_disabling)[0]
    assert out["summed"] and out["both_nonzero"]
    assert out["adapted_differs"] and out["disabled_is_base"] and out["enabled_again"]
