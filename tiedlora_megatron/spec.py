"""megatron-core's local GPT spec with a normalization that works under sequence parallelism.

megatron's local spec uses `WrappedTorchNorm`, which refuses `sequence_parallel=True` (and
`TransformerBlock` uses it for the final norm whenever it is given a layer spec). Under sequence
parallelism each TP rank sees a different slice of the sequence, so a norm's weight/bias grads
are partial sums: `finalize_model_grads` sums grads over the TP group for params marked
`sequence_parallel` (when `config.sequence_parallel`). `SequenceParallelNorm` is a plain torch
LayerNorm/RMSNorm (same state-dict keys as `WrappedTorchNorm`) with that mark.

Use `gpt_block_spec(config, vp_stage=...)` as `GPTModel(transformer_layer_spec=...)` to get the
final norm too; `gpt_layer_spec()` is the per-layer spec. `te_gpt_block_spec` is megatron-core's
own Transformer Engine block spec (TE handles sequence parallel norms itself), behind a clear
error where TE is missing.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig


def unfused_settings() -> dict[str, bool]:
    """TransformerConfig fields that switch off megatron's fused kernels: each needs apex or
    Transformer Engine, which CPU machines (and plain GPU hosts) do not have."""
    return dict(
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


_LAYER_NORM_FIELDS = ("input_layernorm", "pre_mlp_layernorm")
_QK_NORM_FIELDS = ("q_layernorm", "k_layernorm")


class SequenceParallelNorm:
    """Builds `torch.nn.LayerNorm` or `torch.nn.RMSNorm` (per `config.normalization`) whose params
    carry `sequence_parallel = config.sequence_parallel`, for finalize_model_grads' TP all-reduce.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("SequenceParallelNorm does not support zero-centered gamma")
        if config.normalization == "LayerNorm":
            norm: torch.nn.Module = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def gpt_layer_spec(
    num_experts: int | None = None,
    qk_layernorm: bool = False,
    normalization: str | None = None,
) -> ModuleSpec:
    """`get_gpt_layer_local_spec` with `SequenceParallelNorm` for every norm; with `num_experts`,
    MoE layers of `SequentialMLP` experts (no grouped GEMM: the adapters reach each expert).

    As in megatron's local spec, the norm type follows `config.normalization`.
    """
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=qk_layernorm,
        normalization=normalization,
    )
    layer = spec.submodules
    attention = layer.self_attention
    attention_norms = {
        name: SequenceParallelNorm
        for name in _QK_NORM_FIELDS
        if getattr(attention.submodules, name, IdentityOp) is not IdentityOp
    }
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, **attention_norms)
    )
    layer_norms = dict.fromkeys(_LAYER_NORM_FIELDS, SequenceParallelNorm)
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(layer, self_attention=attention, **layer_norms)
    )


def gpt_block_spec(
    config: TransformerConfig,
    qk_layernorm: bool = False,
    normalization: str | None = None,
    vp_stage: int | None = None,
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (virtual stage `vp_stage`) plus a `SequenceParallelNorm`
    final norm: pass it to `GPTModel` as `transformer_layer_spec`. Query / key norms when
    `qk_layernorm` or the config's.
    """
    qk = qk_layernorm or config.qk_layernorm
    layer = gpt_layer_spec(config.num_moe_experts, qk, normalization)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers, layer_norm=SequenceParallelNorm
    )


def te_gpt_block_spec(
    config: TransformerConfig, normalization: str | None = None, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """megatron-core's Transformer Engine GPT block spec for this pipeline stage (dense layers:
    TELayerNormColumnParallelLinear for linear_qkv and linear_fc1, TERowParallelLinear for
    linear_proj and linear_fc2, a TENorm final norm). Raises
    te.TransformerEngineUnavailableError when TE is missing or too old."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from tiedlora_megatron.te import require_te

    require_te()
    return get_gpt_decoder_block_spec(
        config, use_transformer_engine=True, normalization=normalization, vp_stage=vp_stage
    )
