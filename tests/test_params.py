"""Trainable-parameter accounting from dimensions, against hand-derived numbers."""

from __future__ import annotations

from tiedlora_megatron import ModelDims, TiedLoRAConfig, count_trainable_parameters
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
