"""Trainable-parameter accounting from dimensions, against hand-derived numbers."""

from __future__ import annotations

import re

import pytest

from tiedlora_megatron import ConfigError, ModelDims, TiedLoRAConfig, count_trainable_parameters
from tiedlora_megatron.cli import main

LLAMA2_7B = dict(
    hidden_size=4096,
    num_layers=32,
    ffn_hidden_size=11008,
    num_attention_heads=32,
    num_query_groups=32,
)


def test_llama2_7b_qkv_matches_the_paper():
    lora = TiedLoRAConfig.preset("lora", rank=8, target_modules=["linear_qkv"])
    vbua = TiedLoRAConfig.preset("vBuA", rank=8, alpha=16, target_modules=["linear_qkv"])
    n_lora = count_trainable_parameters(lora, **LLAMA2_7B)
    n_vbua = count_trainable_parameters(vbua, **LLAMA2_7B)
    # LoRA: L r (d_in + d_out) = 32 * 8 * (4096 + 12288); vBuA: r (d_in + d_out) + L (r + d_out).
    assert n_lora == 4_194_304
    assert n_vbua == 524_544
    assert round(100 * n_vbua / n_lora, 1) == 12.5


def test_all_targets_gqa_gated_by_hand():
    dims = ModelDims(
        hidden_size=64,
        num_layers=3,
        ffn_hidden_size=96,
        num_attention_heads=8,
        num_query_groups=2,
        gated_linear_unit=True,
    )
    shapes = {  # (d_out, d_in) by hand: head dim 8, qkv (8 + 2*2) * 8 = 96, fc1 2 * 96
        "linear_qkv": (96, 64),
        "linear_proj": (64, 64),
        "linear_fc1": (192, 64),
        "linear_fc2": (64, 96),
    }
    r, L = 4, 3
    targets = list(shapes)
    lora = TiedLoRAConfig.preset("lora", rank=r, target_modules=targets)
    assert count_trainable_parameters(lora, dims) == sum(
        L * r * (i + o) for o, i in shapes.values()
    )
    vera = TiedLoRAConfig.preset("vera", rank=r, target_modules=targets)
    assert count_trainable_parameters(vera, dims) == sum(L * (r + o) for o, _ in shapes.values())
    vba_frozen_a = TiedLoRAConfig.preset("vBuA~", rank=r, target_modules=targets)
    assert count_trainable_parameters(vba_frozen_a, dims) == sum(
        o * r + L * (r + o) for o, _ in shapes.values()
    )


def test_params_cli_prints_the_preset_table(capsys):
    assert (
        main(
            [
                "params",
                "--hidden-size",
                "4096",
                "--num-layers",
                "32",
                "--num-attention-heads",
                "32",
                "--rank",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "4,194,304" in out and "524,544" in out and "12.51%" in out
    assert main(["params", "--model", "llama2-7b", "--presets", "lora", "vBuA"]) == 0
    assert "524,544" in capsys.readouterr().out


def test_mixtral_expert_targets_by_hand():
    """Mixtral-8x7B (hidden 4096, 32 layers, 8 experts of SwiGLU size 14336), rank 8 on the
    experts' fc1 (28672 x 4096) and fc2 (4096 x 14336): L·E = 256 modules of each."""
    from tiedlora_megatron.cli import KNOWN_DIMS

    dims, targets = KNOWN_DIMS["mixtral-8x7b"], ["experts.linear_fc1", "experts.linear_fc2"]
    lora = 256 * 8 * (4096 + 28672) + 256 * 8 * (14336 + 4096)
    shared = 8 * (4096 + 28672) + 256 * (8 + 28672) + 8 * (14336 + 4096) + 256 * (8 + 4096)
    per_expert = shared + 7 * 8 * (4096 + 28672 + 14336 + 4096)
    cfg = TiedLoRAConfig.preset
    assert count_trainable_parameters(cfg("lora", target_modules=targets), dims) == lora
    assert count_trainable_parameters(cfg("vBuA", target_modules=targets), dims) == shared
    per = cfg("vBuA", target_modules=targets, tie_experts=False)
    assert count_trainable_parameters(per, dims) == per_expert
    assert (lora, shared, per_expert) == (104_857_600, 8_802_304, 11_669_504)


def test_moe_dims_refuse_an_mlp_they_do_not_have():
    from tiedlora_megatron.cli import KNOWN_DIMS

    with pytest.raises(ConfigError, match="'linear_fc1': the model has no such MLP"):
        count_trainable_parameters(
            TiedLoRAConfig(target_modules=["linear_fc1"]), KNOWN_DIMS["mixtral-8x7b"]
        )
    with pytest.raises(ConfigError, match="no shared expert"):
        count_trainable_parameters(
            TiedLoRAConfig(target_modules=["shared_experts.linear_fc1"]),
            KNOWN_DIMS["mixtral-8x7b"],
        )
    qwen = KNOWN_DIMS["qwen1.5-moe-a2.7b"]  # shared expert 5632, SwiGLU: fc1 11264 x 2048
    cfg = TiedLoRAConfig.preset("lora", rank=8, target_modules=["shared_experts.linear_fc1"])
    assert count_trainable_parameters(cfg, qwen) == 24 * 8 * (2048 + 11264)


def test_params_cli_prints_expert_sharing_for_moe(capsys):
    argv = ["params", "--model", "mixtral-8x7b", "--presets", "lora", "vBuA"]
    assert main([*argv, "--targets", "experts.linear_fc1", "experts.linear_fc2"]) == 0
    out = capsys.readouterr().out
    assert "8 routed experts per layer" in out
    assert re.search(r"lora\s+BA\s+no\s+own\s+104,857,600\s+100.00%", out)
    assert re.search(r"vBuA\s+vBuA\s+yes\s+all\s+8,802,304\s+8.39%", out)
    assert re.search(r"vBuA\s+vBuA\s+yes\s+per expert\s+11,669,504\s+11.13%", out)
    assert main([*argv, "--targets", "linear_fc1"]) == 2
    assert "has no such MLP" in capsys.readouterr().err
