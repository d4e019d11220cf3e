"""A checkpoint-format-independent description of a decoder-only GPT and the megatron model for it.

HF configs, GGUF metadata and megatron checkpoints all reduce to a `GPTArch`; one builder then
makes the megatron-core `GPTModel` chunks for the current TP / PP / virtual-PP layout, so every
loader shares the same parallel-size checks and the same `TransformerConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
#: megatron-core layer spec a model is built on: local (plain torch) or Transformer Engine.
LayerSpec = Literal["local", "te"]

# megatron-LM pads the vocabulary to a multiple of this times TP; we do the same, but only when
# the real vocabulary does not already split evenly.
VOCAB_PAD_MULTIPLE = 128


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (tanh approximation, HF `gelu_new`)."""
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu}


@dataclass(frozen=True)
class GPTArch:
    """Everything needed to build a megatron GPTModel that reproduces a pretrained model."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    normalization: Literal["RMSNorm", "LayerNorm"]
    norm_eps: float
    gated_linear_unit: bool
    activation: Activation
    position_embedding_type: Literal["rope", "learned_absolute"]
    tie_embeddings: bool
    add_bias_linear: bool
    add_qkv_bias: bool
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling_factor: float | None = None
    qk_layernorm: bool = False
    """RMSNorm of each query and key head before RoPE (Qwen3)."""
    # Mixture of experts (models/moe.py); None / defaults: a dense model.
    num_moe_experts: int | None = None
    moe_router_topk: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_router_pre_softmax: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTArch:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GPTArch fields {unknown}: written by a newer version?")
        return cls(**d)

    def usable_tp_sizes(self, limit: int = 64) -> list[int]:
        return [tp for tp in range(1, limit + 1) if not self._tp_problems(tp)]

    def _tp_problems(self, tp: int) -> list[str]:
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups % tp and tp % self.num_query_groups:
            problems.append(
                f"num_query_groups={self.num_query_groups} (must divide or be a multiple of TP)"
            )
        if self.num_moe_experts:  # routed experts are whole per rank (expert TP 1)
            shared = self.moe_shared_expert_intermediate_size
            if shared and shared % tp:
                problems.append(f"moe_shared_expert_intermediate_size={shared}")
        elif self.ffn_hidden_size % tp:
            problems.append(f"ffn_hidden_size={self.ffn_hidden_size}")
        return problems

    def check_parallel(
        self,
        tp: int,
        pp: int,
        vp: int | None,
        ep: int = 1,
        sequence_parallel: bool = False,
        etp: int = 1,
    ) -> None:
        """Raise a ValueError naming each model dimension that the layout cannot split."""
        from tiedlora_megatron.models.moe import moe_parallel_problems

        moe = moe_parallel_problems(self, tp, ep, sequence_parallel, etp)
        if moe:
            raise ValueError(f"{self.family} model at this layout: {'; '.join(moe)}")
        problems = self._tp_problems(tp)
        if problems:
            raise ValueError(
                f"{self.family} model cannot be split at tensor_model_parallel_size={tp}: "
                f"{', '.join(problems)} not divisible by {tp}; "
                f"usable TP sizes: {self.usable_tp_sizes()}"
            )
        stages = pp * (vp or 1)
        if self.num_layers % stages:
            raise ValueError(
                f"{self.family} model has num_layers={self.num_layers}, which cannot be split "
                f"evenly over pipeline_model_parallel_size={pp} x virtual={vp or 1} stages"
            )

    def padded_vocab_size(self, tp: int) -> int:
        """The vocabulary is split over TP ranks; pad it (megatron-style) only when it must."""
        if self.vocab_size % tp == 0:
            return self.vocab_size
        multiple = VOCAB_PAD_MULTIPLE * tp
        return math.ceil(self.vocab_size / multiple) * multiple


@dataclass(frozen=True)
class ModelInfo:
    """What a loader built: the architecture and where its weights came from."""

    arch: GPTArch
    path: str
    format: Literal["hf", "gguf", "megatron"]


def transformer_config(
    arch: GPTArch,
    tp: int,
    pp: int,
    vp: int | None,
    dtype: torch.dtype,
    overrides: dict[str, Any] | None = None,
    ep: int = 1,
    etp: int = 1,
):
    """The megatron TransformerConfig for `arch`: inference-exact, CPU-safe (fusions off).

    `overrides` sets training-time fields (sequence_parallel, recompute_*, ...) on top."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tiedlora_megatron.models.moe import moe_config_fields
    from tiedlora_megatron.spec import unfused_settings

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=arch.gated_linear_unit,
        activation_func=_ACTIVATIONS[arch.activation],
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,
        **{**unfused_settings(), **moe_config_fields(arch, ep, etp), **(overrides or {})},
    )


def build_model(
    arch: GPTArch,
    dtype: torch.dtype = torch.float32,
    padded_vocab_size: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    spec: LayerSpec = "local",
) -> list:
    """Uninitialised GPTModel chunks for this rank (one per virtual pipeline stage).

    TP / PP / virtual-PP sizes come from megatron's `parallel_state`, which must be initialised.
    `padded_vocab_size` fixes the embedding rows (a checkpoint's), instead of padding for TP.
    `config_overrides` are extra TransformerConfig fields (see `transformer_config`). `spec` is
    megatron-core's local spec (`spec.gpt_block_spec`) or its Transformer Engine spec
    (`spec.te_gpt_block_spec`; the weight loaders fill both alike).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from tiedlora_megatron.spec import gpt_block_spec, te_gpt_block_spec

    if spec not in ("local", "te"):
        raise ValueError(f"spec must be 'local' or 'te', not {spec!r}")
    if spec == "te" and arch.num_moe_experts:
        raise ValueError(
            f"{arch.family}: MoE models are built on the local spec only (SequentialMLP experts, "
            "which the adapters can reach one expert at a time); use spec='local'"
        )
    block_spec = te_gpt_block_spec if spec == "te" else gpt_block_spec

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vp = ps.get_virtual_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    etp = ps.get_expert_tensor_parallel_world_size()
    sp = bool((config_overrides or {}).get("sequence_parallel", False))
    arch.check_parallel(tp, pp, vp, ep, sp, etp)
    vocab = padded_vocab_size or arch.padded_vocab_size(tp)
    if vocab % tp:
        raise ValueError(
            f"the checkpoint's padded vocabulary of {vocab} rows cannot be split over "
            f"tensor_model_parallel_size={tp}"
        )
    config = transformer_config(arch, tp, pp, vp, dtype, config_overrides, ep, etp)
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp is not None else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=block_spec(
                    config, normalization=arch.normalization, vp_stage=vp_stage
                ),
                vocab_size=vocab,
                max_sequence_length=arch.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=arch.tie_embeddings,
                position_embedding_type=arch.position_embedding_type,
                rotary_percent=arch.rotary_percent,
                rotary_base=arch.rotary_base,
                rope_scaling=arch.rope_scaling_factor is not None,
                rope_scaling_factor=arch.rope_scaling_factor or 8.0,
                vp_stage=vp_stage,
            )
        )
    for chunk in chunks:
        chunk.eval()
    return chunks
