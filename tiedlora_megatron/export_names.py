"""Where a megatron adapter lands in an HF model: module names, row pieces, tensor names.

- `HF_TARGETS`: per model family, each megatron target's HF modules and the logical piece of its
  rows each one takes (`row_pieces` cuts them: the fused QKV per query group into q / k / v or
  GPT-2's c_attn [q; k; v], a SwiGLU fc1 into gate / up).
- `check_adapters`: refuse a model or adapter with no HF equivalent before anything is written.
- `hf_tensors`: the HF loader's mapping inverted, logical tensors back under HF names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from tiedlora_megatron.inject import TiedLoRAAdapters
from tiedlora_megatron.models.arch import GPTArch
from tiedlora_megatron.models.hf import (
    LLAMA_FAMILY,
    WeightEntry,
    arch_from_hf_config,
    gpt2_weight_names,
    llama_weight_names,
)
from tiedlora_megatron.models.moe import MOE_MODEL_TYPES, moe_weight_names
from tiedlora_megatron.pipeline import unwrap


class ExportError(ValueError):
    """An adapter or model that cannot be exported as asked, with the reason."""


# -- megatron -> HF names ----------------------------------------------------------------------

_LLAMA_ATTENTION = {
    "linear_qkv": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"},
    "linear_proj": {"self_attn.o_proj": "o"},
}

#: Per family: megatron target -> {HF module (under the layer) -> logical piece of its rows}.
#: `{e}` in a module stands for the global expert index of a routed expert's adapter.
HF_TARGETS: dict[str, dict[str, dict[str, str]]] = {
    "llama": {
        "linear_qkv": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"},
        "linear_proj": {"self_attn.o_proj": "o"},
        "linear_fc1": {"mlp.gate_proj": "gate", "mlp.up_proj": "up"},
        "linear_fc2": {"mlp.down_proj": "down"},
    },
    "gpt2": {
        "linear_qkv": {"attn.c_attn": "qkv"},
        "linear_proj": {"attn.c_proj": "o"},
        "linear_fc1": {"mlp.c_fc": "fc1"},
        "linear_fc2": {"mlp.c_proj": "down"},
    },
    # vLLM's MoE LoRA layout: one lora_A / lora_B per expert's projection.
    "mixtral": {
        **_LLAMA_ATTENTION,
        "experts.linear_fc1": {
            "block_sparse_moe.experts.{e}.w1": "gate",
            "block_sparse_moe.experts.{e}.w3": "up",
        },
        "experts.linear_fc2": {"block_sparse_moe.experts.{e}.w2": "down"},
    },
    "qwen2_moe": {
        **_LLAMA_ATTENTION,
        "experts.linear_fc1": {
            "mlp.experts.{e}.gate_proj": "gate",
            "mlp.experts.{e}.up_proj": "up",
        },
        "experts.linear_fc2": {"mlp.experts.{e}.down_proj": "down"},
        "shared_experts.linear_fc1": {
            "mlp.shared_expert.gate_proj": "gate",
            "mlp.shared_expert.up_proj": "up",
        },
        "shared_experts.linear_fc2": {"mlp.shared_expert.down_proj": "down"},
    },
    "qwen3_moe": {
        **_LLAMA_ATTENTION,
        "experts.linear_fc1": {
            "mlp.experts.{e}.gate_proj": "gate",
            "mlp.experts.{e}.up_proj": "up",
        },
        "experts.linear_fc2": {"mlp.experts.{e}.down_proj": "down"},
    },
}
#: Where each target sits in a megatron TransformerLayer (a routed expert's or the shared one's).
TARGET_PATH = re.compile(
    r"(?:^|\.)decoder\.layers\.\d+\.(?:self_attention|mlp)\."
    r"(?:experts\.local_experts\.\d+\.|shared_experts\.)?(linear_\w+)$"
)


def hf_family(arch: GPTArch) -> str:
    if arch.family in LLAMA_FAMILY:
        return "llama"
    if arch.family in ("gpt2", *MOE_MODEL_TYPES):
        return arch.family
    raise ExportError(
        f"model family {arch.family!r} has no HF equivalent here; export supports "
        f"{', '.join((*LLAMA_FAMILY, 'gpt2', *MOE_MODEL_TYPES))}"
    )


def hf_modules(family: str, adapter) -> dict[str, str]:
    """{HF module under the layer: logical piece} of one adapter (its expert's modules)."""
    modules = HF_TARGETS[family][adapter.kind]
    return {m.format(e=adapter.expert): piece for m, piece in modules.items()}


def layer_prefix(arch: GPTArch, index: int) -> str:
    """The HF (…ForCausalLM) module path of decoder layer `index` (0-based)."""
    return f"transformer.h.{index}." if hf_family(arch) == "gpt2" else f"model.layers.{index}."


def row_pieces(kind: str, rows: torch.Tensor, arch: GPTArch) -> dict[str, torch.Tensor]:
    """The logical pieces (q, k, v, qkv, gate, up, ...) of a tensor whose first dim is a megatron
    target's global output rows; `qkv` is HF's fused [q; k; v] order (GPT-2's c_attn). An
    expert's fc1 / fc2 is cut as a dense one."""
    kind = kind.rsplit(".", 1)[-1]
    if kind == "linear_qkv":
        groups = arch.num_query_groups
        per_group = arch.num_attention_heads // groups
        x = rows.reshape(groups, per_group + 2, arch.kv_channels, *rows.shape[1:])
        q = x[:, :per_group].reshape(-1, *rows.shape[1:])
        k = x[:, per_group].reshape(-1, *rows.shape[1:])
        v = x[:, per_group + 1].reshape(-1, *rows.shape[1:])
        return {"q": q, "k": k, "v": v, "qkv": torch.cat([q, k, v])}
    if kind == "linear_fc1":
        if arch.gated_linear_unit:
            gate, up = rows.chunk(2)
            return {"gate": gate, "up": up}
        return {"fc1": rows}
    return {"o" if kind == "linear_proj" else "down": rows}


#: The dims an adapter is tied to: a base that differs in any is another model.
DIM_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "gated_linear_unit",
)


def check_base(chunks: Sequence[nn.Module], arch: GPTArch) -> None:
    """Refuse a model whose megatron dims are not those of `arch` (another base)."""
    config = unwrap(chunks[0]).config
    fields = DIM_FIELDS
    problems = [
        f"{f}: model {getattr(config, f)!r}, HF config {getattr(arch, f)!r}"
        for f in fields
        if getattr(config, f) != getattr(arch, f)
    ]
    if problems:
        raise ExportError(
            "the model does not match the HF base it is exported for:\n  " + "\n  ".join(problems)
        )


def check_adapters(adapters: TiedLoRAAdapters, chunks: Sequence[nn.Module], arch: GPTArch) -> None:
    check_base(chunks, arch)
    family = hf_family(arch)
    bare = [unwrap(c) for c in chunks]
    if len(bare) != len(adapters.chunks) or any(
        a is not b for a, b in zip(bare, (unwrap(c) for c in adapters.chunks), strict=False)
    ):
        raise ExportError("the adapters were applied to other model chunks than the ones given")
    for chunk_adapters in adapters.adapters:
        for name, adapter in chunk_adapters.items():
            if (
                TARGET_PATH.search(name) is None
                or adapter.kind not in HF_TARGETS[family]
                or adapter.layer_number is None
            ):
                raise ExportError(
                    f"{name}: adapted module has no HF {arch.family} equivalent (exportable are "
                    f"the {', '.join(HF_TARGETS[family])} of decoder layers)"
                )


def resolve_arch(arch_or_hf_config: GPTArch | dict) -> tuple[GPTArch, str]:
    """(arch, base model name for PEFT's config) from a GPTArch or an HF config dict (a base
    model given by path: `export_base.resolve_base`)."""
    if isinstance(arch_or_hf_config, GPTArch):
        return arch_or_hf_config, ""
    return arch_from_hf_config(arch_or_hf_config), arch_or_hf_config.get("_name_or_path", "")


def peft_target_modules(adapted: set[str], family: str, experts: int = 0) -> list[str]:
    """PEFT's target_modules: a module's own name where that picks only adapted modules, its
    qualified name where another HF module shares the name (GPT-2's attn / mlp c_proj, a
    Qwen2-MoE expert's and the shared expert's gate_proj)."""
    every = [
        m.format(e=e)
        for mods in HF_TARGETS[family].values()
        for m in mods
        for e in (range(experts) if "{e}" in m else [0])
    ]
    out = set()
    for module in adapted:
        leaf = module.rsplit(".", 1)[-1]
        clash = any(m not in adapted and m.rsplit(".", 1)[-1] == leaf for m in every)
        out.add(module if clash else leaf)
    return sorted(out)


def hf_tensors(logical: dict[str, torch.Tensor], arch: GPTArch) -> dict[str, torch.Tensor]:
    """Logical tensors under HF names, inverting the loader's map (GPT-2: q, k, v into c_attn,
    Conv1D weights transposed back to [in, out])."""
    names_of = gpt2_weight_names if arch.family == "gpt2" else llama_weight_names
    prefix = "transformer." if arch.family == "gpt2" else "model."
    names = names_of(arch, prefix)
    if arch.num_moe_experts:
        names.update(moe_weight_names(arch, prefix))
    parts: dict[str, list[tuple[WeightEntry, torch.Tensor]]] = {}
    for name, value in logical.items():
        entry = names[name]
        parts.setdefault(entry.tensor, []).append((entry, value))
    out = {}
    for tensor, pieces in parts.items():
        pieces.sort(key=lambda p: p[0].offset)
        value = torch.cat([v for _, v in pieces])
        out[tensor] = value.T.contiguous() if pieces[0][0].transposed else value
    return out
