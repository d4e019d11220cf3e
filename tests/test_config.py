"""TiedLoRAConfig: presets, notation and one test per validation rule."""

from __future__ import annotations

import pytest

from tiedlora_megatron import PRESETS, ConfigError, TiedLoRAConfig
from tiedlora_megatron.config import format_notation, parse_notation


def test_notation_parses_paper_and_ascii_forms():
    assert parse_notation("vB\u0336uA") == {"v": True, "B": False, "u": True, "A": True}
    assert parse_notation("vB~uA~") == {"v": True, "B": False, "u": True, "A": False}
    assert format_notation(parse_notation("vB\u0336uA\u0336")) == "vB~uA~"
    assert TiedLoRAConfig.preset("vB\u0336uA").factors == "vB~uA"


def test_every_preset_is_valid_and_starts_at_zero():
    for name in PRESETS:
        cfg = TiedLoRAConfig.preset(name, rank=4)
        zero = [f for f in cfg.used if cfg.factor_spec(f).starts_at_zero]
        assert zero == [cfg.zero_factor], name
        assert cfg.trains(cfg.zero_factor), name


def test_lora_vera_and_tied_presets_match_their_definitions():
    lora = TiedLoRAConfig.preset("lora")
    assert (lora.factors, lora.tied) == ("BA", False)
    assert lora.factor_spec("B").init == "zeros" and lora.factor_spec("A").init == "kaiming_uniform"
    vera = TiedLoRAConfig.preset("vera")
    assert (vera.factors, vera.tied) == ("vB~uA~", True)
    assert vera.factor_spec("v").init == 0.0 and vera.factor_spec("u").init == 0.1
    assert not vera.trains("A") and not vera.trains("B")
    vbua = TiedLoRAConfig.preset("vBuA", rank=8, alpha=16)
    assert vbua.tied and all(vbua.trains(f) for f in "vBuA")
    assert vbua.factor_spec("v").init == 0.0 and vbua.factor_spec("B").init == "kaiming_uniform"
    assert vbua.scaling == 2.0
    assert TiedLoRAConfig(rank=4).scaling == 1.0  # alpha None -> alpha = rank


def test_overrides_and_dict_round_trip():
    cfg = TiedLoRAConfig.preset(
        "vBuA", rank=16, target_modules=["linear_qkv", "linear_fc2"], seed=7
    )
    assert TiedLoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_rank_below_one_is_refused():
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        TiedLoRAConfig(rank=0)


def test_unknown_target_is_refused_with_a_suggestion():
    with pytest.raises(
        ConfigError, match="unknown target module 'linear_qkvv'.*did you mean 'linear_qkv'"
    ):
        TiedLoRAConfig(target_modules=["linear_qkvv"])


def test_empty_targets_are_refused():
    with pytest.raises(ConfigError, match="target_modules is empty"):
        TiedLoRAConfig(target_modules=[])


def test_nothing_trainable_is_refused():
    with pytest.raises(ConfigError, match="trains nothing"):
        TiedLoRAConfig(factors="B~A~")


def test_start_with_nonzero_delta_is_refused():
    with pytest.raises(ConfigError, match="no factor of 'vBA' starts at zero"):
        TiedLoRAConfig(factors="vBA", v_init=0.5, b_init="kaiming_uniform", a_init="normal")


def test_two_zero_factors_are_refused():
    with pytest.raises(ConfigError, match="v and B both start at zero"):
        TiedLoRAConfig(factors="vBuA", v_init=0.0, b_init="zeros")


def test_frozen_zero_factor_is_refused():
    with pytest.raises(ConfigError, match="B starts at zero but is frozen"):
        TiedLoRAConfig(factors="vB~uA", b_init="zeros")


def test_init_of_unused_factor_is_refused():
    with pytest.raises(ConfigError, match="u_init is set but u is not used"):
        TiedLoRAConfig(factors="vBA", u_init=0.1)


def test_bad_matrix_init_is_refused():
    with pytest.raises(ConfigError, match="a_init must be one of"):
        TiedLoRAConfig(a_init="uniform")


@pytest.mark.parametrize(
    "notation, message",
    [
        ("AvB", "order v, B, u, A"),
        ("vBxA", "unknown letter 'x'"),
        ("vBuu", "'u' appears twice"),
        ("v~BA", "frozen vector v~"),
        ("vuA", "B is missing"),
    ],
)
def test_bad_notation_is_refused(notation, message):
    with pytest.raises(ConfigError, match=message):
        TiedLoRAConfig(factors=notation)


def test_unknown_preset_names_the_presets():
    with pytest.raises(ConfigError, match="unknown preset 'lorra'.*did you mean 'lora'"):
        TiedLoRAConfig.preset("lorra")


def test_config_typo_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="'rnak' \\(did you mean 'rank'\\?\\)"):
        TiedLoRAConfig.from_dict({"rnak": 8})
    with pytest.raises(ConfigError, match="did you mean 'target_modules'"):
        TiedLoRAConfig.preset("vBuA", target_module=["linear_qkv"])


def test_alpha_and_dropout_ranges():
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        TiedLoRAConfig(alpha=0)
    with pytest.raises(ConfigError, match="dropout must be in"):
        TiedLoRAConfig(dropout=1.0)


def test_duplicate_target_is_refused():
    with pytest.raises(ConfigError, match="lists a module twice"):
        TiedLoRAConfig(target_modules=["linear_qkv", "linear_qkv"])


def test_tie_experts_follows_tied_unless_set():
    assert TiedLoRAConfig.preset("vBuA").tie_experts is True
    assert TiedLoRAConfig.preset("lora").tie_experts is False
    per = TiedLoRAConfig.preset("vBuA", tie_experts=False)
    assert TiedLoRAConfig.from_dict(per.to_dict()) == per
    assert (
        "experts.linear_fc1" in TiedLoRAConfig(target_modules=["experts.linear_fc1"]).target_modules
    )
