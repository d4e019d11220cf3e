"""Trainable-parameter accounting from model dimensions alone (no model needed).

For one target kind of shape d_out x d_in over L layers at rank r, with the factors of the
config trained:

    tied:    [A] r·d_in + [B] d_out·r + L·([u] r + [v] d_out)
    untied:  L·([A] r·d_in + [B] d_out·r + [u] r + [v] d_out)

so LoRA is L·r·(d_in + d_out) and vBuA r·(d_in + d_out) + L·(r + d_out). A built model's count
(`TiedLoRAAdapters.num_trainable_parameters`) must equal this; the tests check that it does.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiedlora_megatron.config import PRESETS, TiedLoRAConfig


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
        )

    def target_shape(self, target: str) -> tuple[int, int]:
        """(d_out, d_in) of a target kind, unsharded."""
        heads = self.num_attention_heads
        groups = self.num_query_groups or heads
        head_dim = self.kv_channels or self.hidden_size // heads
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        shapes = {
            "linear_qkv": ((heads + 2 * groups) * head_dim, self.hidden_size),
            "linear_proj": (self.hidden_size, heads * head_dim),
            "linear_fc1": (ffn * (2 if self.gated_linear_unit else 1), self.hidden_size),
            "linear_fc2": (self.hidden_size, ffn),
        }
        return shapes[target]


def count_for_target(config: TiedLoRAConfig, d_out: int, d_in: int, num_layers: int) -> int:
    """Trainable parameters of one target kind (see the module docstring)."""
    r = config.rank
    matrices = (r * d_in if config.trains("A") else 0) + (d_out * r if config.trains("B") else 0)
    vectors = (r if config.trains("u") else 0) + (d_out if config.trains("v") else 0)
    if config.tied:
        return matrices + num_layers * vectors
    return num_layers * (matrices + vectors)


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
        total += count_for_target(config, d_out, d_in, dims.num_layers)
    return total


def preset_table(
    dims: ModelDims, rank: int, target_modules: list[str], presets: list[str] | None = None
) -> list[dict[str, object]]:
    """One row per preset: its notation, tied flag, trainable parameters and ratio to LoRA."""
    names = presets or list(PRESETS)
    lora = count_trainable_parameters(
        TiedLoRAConfig.preset("lora", rank=rank, target_modules=target_modules), dims
    )
    rows = []
    for name in names:
        cfg = TiedLoRAConfig.preset(name, rank=rank, target_modules=target_modules)
        n = count_trainable_parameters(cfg, dims)
        rows.append(
            {
                "preset": name,
                "factors": cfg.factors,
                "tied": cfg.tied,
                "trainable": n,
                "vs_lora": n / lora,
            }
        )
    return rows
