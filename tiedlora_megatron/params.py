"""Trainable-parameter accounting from model dimensions alone (no model needed).

For one target kind of shape d_out x d_in over L layers at rank r, with the factors of the
config trained:

    tied:    [A] r·d_in + [B] d_out·r + L·([u] r + [v] d_out)
    untied:  L·([A] r·d_in + [B] d_out·r + [u] r + [v] d_out)

so LoRA is L·r·(d_in + d_out) and vBuA r·(d_in + d_out) + L·(r + d_out). A routed-expert
target of an MoE model with E experts per layer has L·E modules, and its pair is shared by all
of them (`tie_experts`), one per expert (E pairs), or each module's own when untied:

    tied, tie_experts:   [A, B] once      + L·E·([u] r + [v] d_out)
    tied, per expert:    E·[A, B]         + L·E·([u] r + [v] d_out)
    untied:              L·E·([A] r·d_in + [B] d_out·r + [u] r + [v] d_out)

A built model's count (`TiedLoRAAdapters.num_trainable_parameters`) must equal this; the tests
check that it does.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiedlora_megatron.config import PRESETS, ConfigError, TiedLoRAConfig
from tiedlora_megatron.experts import ROUTED, SHARED, is_routed


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of a GPT-style transformer that decide the adapters' shapes."""

    hidden_size: int
    num_layers: int
    ffn_hidden_size: int | None = None
    """Defaults to 4 x hidden_size, as in megatron-core."""
    num_attention_heads: int = 1
    num_query_groups: int | None = None
    """Key/value heads (GQA); defaults to num_attention_heads."""
    kv_channels: int | None = None
    """Per-head size; defaults to hidden_size / num_attention_heads."""
    gated_linear_unit: bool = False
    """SwiGLU-style fc1 (Llama family): fc1 outputs 2 x ffn_hidden_size."""
    num_moe_experts: int | None = None
    """Routed experts per layer of an MoE model (every layer an MoE layer); None: dense."""
    moe_ffn_hidden_size: int | None = None
    """A routed expert's hidden size; defaults to ffn_hidden_size."""
    moe_shared_expert_intermediate_size: int | None = None
    """The shared expert's hidden size (Qwen-MoE, DeepSeek); None: no shared expert."""

    @classmethod
    def from_transformer_config(cls, config) -> ModelDims:
        """The dims of a megatron-core TransformerConfig."""
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            ffn_hidden_size=config.ffn_hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups,
            kv_channels=config.kv_channels,
            gated_linear_unit=config.gated_linear_unit,
            num_moe_experts=config.num_moe_experts,
            moe_ffn_hidden_size=config.moe_ffn_hidden_size if config.num_moe_experts else None,
            moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
        )

    def target_shape(self, target: str) -> tuple[int, int]:
        """(d_out, d_in) of a target kind, unsharded."""
        heads = self.num_attention_heads
        groups = self.num_query_groups or heads
        head_dim = self.kv_channels or self.hidden_size // heads
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        mlps = {"": None if self.num_moe_experts else ffn}
        mlps[f"{ROUTED}."] = (self.moe_ffn_hidden_size or ffn) if self.num_moe_experts else None
        mlps[f"{SHARED}."] = self.moe_shared_expert_intermediate_size
        part, attr = target.rsplit(".", 1) if "." in target else ("", target)
        if attr in ("linear_qkv", "linear_proj"):
            if part:
                raise KeyError(target)
            return {
                "linear_qkv": ((heads + 2 * groups) * head_dim, self.hidden_size),
                "linear_proj": (self.hidden_size, heads * head_dim),
            }[attr]
        size = mlps[f"{part}." if part else ""]
        if size is None:
            mlps = [f"{p}{attr}" for p, n in mlps.items() if n is not None]
            raise ConfigError(
                f"target {target!r}: the model has no such MLP (dims: "
                + ("every layer an MoE layer" if self.num_moe_experts else "dense")
                + (", no shared expert" if part == SHARED else "")
                + f"); its MLP target{'s are' if len(mlps) > 1 else ' is'} {', '.join(mlps)}"
            )
        if attr == "linear_fc1":
            return size * (2 if self.gated_linear_unit else 1), self.hidden_size
        return self.hidden_size, size

    def modules_per_layer(self, target: str) -> int:
        """How many modules of kind `target` one layer has: E for a routed expert's, else 1."""
        return (self.num_moe_experts or 1) if is_routed(target) else 1


def count_for_target(
    config: TiedLoRAConfig, d_out: int, d_in: int, num_layers: int, experts: int = 1
) -> int:
    """Trainable parameters of one target kind with `experts` modules per layer (see the
    module docstring; `experts` > 1 only for a routed-expert kind)."""
    r = config.rank
    matrices = (r * d_in if config.trains("A") else 0) + (d_out * r if config.trains("B") else 0)
    vectors = (r if config.trains("u") else 0) + (d_out if config.trains("v") else 0)
    modules = num_layers * experts
    if not config.tied:
        return modules * (matrices + vectors)
    pairs = 1 if config.tie_experts else experts
    return pairs * matrices + modules * vectors


def count_trainable_parameters(
    config: TiedLoRAConfig, dims: ModelDims | None = None, **dim_kwargs: int | bool | None
) -> int:
    """Trainable adapter parameters of `config` on a model of the given dims.

    Pass a `ModelDims` or its fields as keywords, e.g.
    `count_trainable_parameters(cfg, hidden_size=4096, num_layers=32, num_attention_heads=32)`.
    """
    if dims is None:
        dims = ModelDims(**dim_kwargs)
    elif dim_kwargs:
        raise TypeError("pass either a ModelDims or its fields as keywords, not both")
    total = 0
    for target in config.target_modules:
        d_out, d_in = dims.target_shape(target)
        experts = dims.modules_per_layer(target)
        total += count_for_target(config, d_out, d_in, dims.num_layers, experts)
    return total


def preset_table(
    dims: ModelDims, rank: int, target_modules: list[str], presets: list[str] | None = None
) -> list[dict[str, object]]:
    """One row per preset: its notation, tied flag, how routed experts share the pair
    ("all", "per expert", "own"; "-" without expert targets), trainable parameters and ratio
    to LoRA. With routed-expert targets a tied preset has a row for each `tie_experts`."""
    names = presets or list(PRESETS)
    routed = any(is_routed(t) for t in target_modules)
    lora = count_trainable_parameters(
        TiedLoRAConfig.preset("lora", rank=rank, target_modules=target_modules), dims
    )
    rows = []
    for name in names:
        base = TiedLoRAConfig.preset(name, rank=rank, target_modules=target_modules)
        variants = [True, False] if base.tied and routed else [base.tie_experts]
        for tie in variants:
            cfg = TiedLoRAConfig.preset(
                name, rank=rank, target_modules=target_modules, tie_experts=tie
            )
            n = count_trainable_parameters(cfg, dims)
            sharing = ("all" if tie else "per expert") if cfg.tied else "own"
            rows.append(
                {
                    "preset": name,
                    "factors": cfg.factors,
                    "tied": cfg.tied,
                    "experts": sharing if routed else "-",
                    "trainable": n,
                    "vs_lora": n / lora,
                }
            )
    return rows
