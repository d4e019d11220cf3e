"""Merging adapters into their base layers, and exporting them for HF: PEFT LoRA or merged weights.

A tied adapter is, layer by layer, an ordinary LoRA: ΔW_l = lora_B_l @ lora_A with
`lora_A = A` and `lora_B_l = s · diag(v_l) · B · diag(u_l)` at PEFT scaling 1 (lora_alpha = r),
so any LoRA runtime can serve it without knowing about ties.

- `merge_adapters` / `unmerge_adapters` fold ΔW into (out of) the base weights in place: every
  rank changes only its own shard (ΔW_local = B_eff @ A_eff, computed in fp32), so nothing is
  gathered, and the adapters' hooks are detached while merged so the update is not counted twice.
- `export_peft` writes `adapter_config.json` + `adapter_model.safetensors` under the HF model's
  module names: megatron's fused QKV rows (per query group: the group's q heads, k, v) are split
  back into q_proj / k_proj / v_proj (GPT-2: reordered into c_attn's [q; k; v]), and a SwiGLU fc1
  ([gate; up] per TP shard) into gate_proj / up_proj.
- `export_merged_hf` writes an HF checkpoint (safetensors + config + tokenizer files) of the
  base with the adapters folded in, by inverting the HF loader's mapping.

The base is named as a job's `model.source` names it: "smollm2", a GGUF file, an HF model
directory, or a megatron checkpoint with `hf_config` (`export_base`, which also says where a
GGUF base's config.json and tokenizer come from).

Exports are collective (every rank calls them): TP shards are gathered within their TP group,
pipeline stages are gathered to global rank 0, which writes to a hidden partial directory and
swaps it into place. An export never writes into, over or around the base model or the adapter
checkpoint, and `overwrite` replaces only an earlier export of this tool (`export_write`).
HF names and row pieces: `export_names`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.adapter import TiedLoRAAdapter
from tiedlora_megatron.export_base import ExportBase, resolve_base
from tiedlora_megatron.export_names import (
    ExportError,
    hf_family,
    hf_modules,
    hf_tensors,
    layer_prefix,
    peft_target_modules,
    resolve_arch,
    row_pieces,
)
from tiedlora_megatron.export_write import prepare, save_safetensors, to_rank0, write_export
from tiedlora_megatron.full_state import gather_full
from tiedlora_megatron.inject import TiedLoRAAdapters
from tiedlora_megatron.layouts import describe_linear
from tiedlora_megatron.models.arch import GPTArch
from tiedlora_megatron.pipeline import unwrap

__all__ = [
    "ExportBase",
    "ExportError",
    "export_merged_hf",
    "export_peft",
    "merge_adapters",
    "resolve_base",
    "unmerge_adapters",
]


# -- merge / unmerge -------------------------------------------------------------------------


def _adapted_bases(adapters: TiedLoRAAdapters) -> Iterator[tuple[TiedLoRAAdapter, nn.Module]]:
    for chunk, chunk_adapters in zip(adapters.chunks, adapters.adapters, strict=True):
        bare = unwrap(chunk)
        for name, adapter in chunk_adapters.items():
            yield adapter, bare.get_submodule(name)


def _delta(adapter: TiedLoRAAdapter) -> torch.Tensor:
    """This rank's shard of ΔW, in fp32."""
    a, b = adapter.effective_factors(torch.float32)
    return b @ a


def _merged_weight(adapter: TiedLoRAAdapter, weight: torch.Tensor) -> torch.Tensor:
    """W + ΔW for this rank's shard: added in fp32, rounded once to the base dtype."""
    return (weight.detach().float() + _delta(adapter)).to(weight.dtype)


@torch.no_grad()
def merge_adapters(adapters: TiedLoRAAdapters) -> None:
    """Fold every adapter into its base layer's weight shard and detach its hook.

    The model then computes the same outputs with no adapter overhead (for serving or
    evaluation); `unmerge_adapters` undoes it. Merging twice would add ΔW twice, so it raises.
    """
    pairs = list(_adapted_bases(adapters))
    merged = [a.base_name for a, _ in pairs if a.merged]
    if merged:
        raise RuntimeError(f"adapters already merged (call unmerge_adapters first): {merged[:3]}")
    for adapter, base in pairs:
        base.weight.copy_(_merged_weight(adapter, base.weight))
        adapter.detach()
        adapter.merged = True


@torch.no_grad()
def unmerge_adapters(adapters: TiedLoRAAdapters) -> None:
    """Subtract every merged adapter's ΔW from its base weight again (fp32, then cast: the base
    comes back within one rounding) and re-attach its hook. The factors must not have changed
    since the merge."""
    pairs = list(_adapted_bases(adapters))
    missing = [a.base_name for a, _ in pairs if not a.merged]
    if missing:
        raise RuntimeError(f"adapters are not merged (call merge_adapters first): {missing[:3]}")
    for adapter, base in pairs:
        w = base.weight
        w.copy_((w.float() - _delta(adapter)).to(w.dtype))
        adapter.attach(base)
        adapter.merged = False


def _protected(
    base: ExportBase | None,
    adapters: TiedLoRAAdapters,
    adapter_checkpoint: str | os.PathLike | None,
) -> dict[str, Path]:
    """What an export must not touch: the base model's files (when given by path) and the
    adapter checkpoint (given, or the one `load_adapter_checkpoint` loaded these adapters from)."""
    from tiedlora_megatron.checkpoint import loaded_from

    out = {} if base is None else base.protected()
    loaded = loaded_from(adapters)
    if adapter_checkpoint is not None:
        out["adapter checkpoint"] = Path(adapter_checkpoint)
    if loaded is not None and loaded != out.get("adapter checkpoint"):
        out["adapter checkpoint these adapters were loaded from"] = loaded
    return out


# -- PEFT export -------------------------------------------------------------------------------

#: A PEFT tensor name -> the HF module under the decoder layer.
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?:model\.layers|transformer\.h)\.\d+\.(.+)\.lora_[AB]\."
)


def _peft_factors(adapter: TiedLoRAAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) in fp32, global, rows in megatron order: A and s · diag(v) · B · diag(u)."""
    lay = adapter.layout
    a = adapter.lowrank.A.detach().float()
    b = adapter.lowrank.B.detach().float() * adapter.scaling
    if adapter.v is not None:
        b = b * adapter.v.detach().float()[:, None]
    if adapter.u is not None:
        b = b * adapter.u.detach().float()[None, :]
    if lay.parallel == "column":
        return a, gather_full(b, lay, 0)
    return gather_full(a, lay, 1), b


def export_peft(
    adapters: TiedLoRAAdapters,
    chunks: Sequence[nn.Module],
    arch_or_base: GPTArch | dict | str | os.PathLike | ExportBase,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    adapter_checkpoint: str | os.PathLike | None = None,
    hf_config: str | os.PathLike | None = None,
) -> Path:
    """Write the adapters as an HF PEFT LoRA adapter (one lora_A / lora_B per HF module, scaling
    1) to `out_dir`, for the HF model described by `arch_or_base`: a GPTArch, an HF config dict,
    or a base model as `export_base.resolve_base` takes it ("smollm2", a GGUF file, an HF model
    directory; a megatron checkpoint with `hf_config`), which PEFT's config then names as the
    base (a GGUF file's path: load it with transformers' `from_pretrained(dir, gguf_file=...)`).

    `out_dir` must not be, lie in or contain the base model or the adapter checkpoint
    (`adapter_checkpoint`, or the one the adapters were loaded from); `overwrite` replaces only
    an earlier export (ExportError otherwise). Collective: every rank calls it; rank 0 writes.
    Merged adapters export the same.
    """
    base = None
    if isinstance(arch_or_base, (GPTArch, dict)):
        arch, base_name = resolve_arch(arch_or_base)
    else:
        base = resolve_base(arch_or_base, hf_config)
        arch, base_name = base.arch, base.name
    protected = _protected(base, adapters, adapter_checkpoint)
    final = prepare(out_dir, overwrite, adapters, chunks, arch, protected)
    family = hf_family(arch)
    tensors: dict[str, torch.Tensor] = {}
    expert_tensors: dict[str, torch.Tensor] = {}  # a routed expert's: on its EP rank only
    dtype = next(iter(adapters.parameters(trainable_only=False))).dtype
    for chunk_adapters in adapters.adapters:
        for adapter in chunk_adapters.values():
            lora_a, lora_b = _peft_factors(adapter)
            pieces = row_pieces(adapter.kind, lora_b, arch)
            prefix = layer_prefix(arch, adapter.layer_number - 1)
            out = tensors if adapter.expert is None else expert_tensors
            for module, piece in hf_modules(family, adapter).items():
                key = f"base_model.model.{prefix}{module}"
                out[f"{key}.lora_A.weight"] = lora_a.to(dtype, copy=True)
                out[f"{key}.lora_B.weight"] = pieces[piece].to(dtype)
    tensors = {**to_rank0(tensors), **to_rank0(expert_tensors, experts=True)}
    adapted = {_LORA_KEY.match(key).group(1) for key in tensors}  # every rank's, on rank 0
    rank = adapters.config.rank
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name or None,
        "r": rank,
        "lora_alpha": rank,  # scaling 1: s, u and v are already in lora_B
        "lora_dropout": 0.0,
        "target_modules": peft_target_modules(adapted, family, arch.num_moe_experts or 0),
        "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D stores [in, out]
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }

    def write(directory: Path) -> None:
        save_safetensors(tensors, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")

    return write_export(final, write, _marker("peft", base, base_name, protected), overwrite)


def _marker(
    fmt: str, base: ExportBase | None, name: str, protected: dict[str, Path]
) -> dict[str, str | None]:
    adapter = next((str(p) for what, p in protected.items() if what.startswith("adapter")), None)
    out = {"format": fmt, "base": str(base.path) if base else name or None}
    if base is not None and base.source is not None:
        out["hf_config"] = str(base.source.path)
    return {**out, "adapter_checkpoint": adapter}


# -- merged HF export --------------------------------------------------------------------------


def _norm_tensors(norm: nn.Module, name: str) -> dict[str, torch.Tensor]:
    from tiedlora_megatron.models.weights import bias_of

    out = {name: norm.weight.detach()}
    if bias_of(norm) is not None:
        out[f"{name}_bias"] = norm.bias.detach()
    return out


def _vocab_rows(weight: torch.Tensor, arch: GPTArch) -> torch.Tensor:
    """The vocabulary-parallel embedding gathered over TP, without megatron's padding rows."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return weight.detach()[: arch.vocab_size]
    parts = [torch.empty_like(weight) for _ in range(tp)]
    dist.all_gather(parts, weight.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts)[: arch.vocab_size]


def _layer_tensors(
    layer: nn.Module, arch: GPTArch, adapter_of: dict[int, TiedLoRAAdapter]
) -> dict[str, torch.Tensor]:
    """Logical tensors ([out, in]) of one transformer layer, gathered, with ΔW folded in."""
    from tiedlora_megatron.models.weights import norm_param_names

    p = f"layers.{layer.layer_number - 1}."
    attn, mlp = layer.self_attention, layer.mlp
    out: dict[str, torch.Tensor] = {}
    for norm, fused, name in (
        (layer.input_layernorm, attn.linear_qkv, "ln1"),
        (layer.pre_mlp_layernorm, getattr(mlp, "linear_fc1", None), "ln2"),
    ):
        weight, bias = norm_param_names(norm, fused)
        out[p + name] = weight.detach()
        if bias is not None:
            out[f"{p}{name}_bias"] = bias.detach()
    if arch.qk_layernorm:
        out[p + "q_norm"] = attn.q_layernorm.weight.detach()
        out[p + "k_norm"] = attn.k_layernorm.weight.detach()
    linears = [(p, "linear_qkv", attn.linear_qkv), (p, "linear_proj", attn.linear_proj)]
    shared = getattr(mlp, "shared_experts", None)
    if arch.num_moe_experts:
        out[p + "router"] = mlp.router.weight.detach()
        if shared is not None:
            linears += [
                (f"{p}shared.", k, getattr(shared, k)) for k in ("linear_fc1", "linear_fc2")
            ]
            if getattr(shared, "gate_weight", None) is not None:
                out[p + "shared_gate"] = shared.gate_weight.detach()
    else:
        linears += [(p, k, getattr(mlp, k)) for k in ("linear_fc1", "linear_fc2")]
    for prefix, kind, module in linears:
        out.update(_linear_tensors(prefix, kind, module, arch, adapter_of))
    return out


def _expert_tensors(
    layer: nn.Module, arch: GPTArch, adapter_of: dict[int, TiedLoRAAdapter]
) -> dict[str, torch.Tensor]:
    """Logical tensors of this rank's routed experts in one MoE layer, with ΔW folded in."""
    if not arch.num_moe_experts:
        return {}
    experts = layer.mlp.experts
    first = experts.ep_group.rank() * experts.num_local_experts
    out: dict[str, torch.Tensor] = {}
    for i, expert in enumerate(experts.local_experts):
        prefix = f"layers.{layer.layer_number - 1}.experts.{first + i}."
        for kind in ("linear_fc1", "linear_fc2"):
            module = getattr(expert, kind)
            out.update(_linear_tensors(prefix, kind, module, arch, adapter_of))
    return out


def _linear_tensors(
    prefix: str, kind: str, module: nn.Module, arch: GPTArch, adapter_of: dict
) -> dict[str, torch.Tensor]:
    """One linear layer's logical pieces (q / k / v, gate / up, ...), gathered over TP, with its
    adapter's ΔW folded in."""
    from tiedlora_megatron.models.weights import bias_of

    layout = describe_linear(module, kind)
    weight = module.weight.detach()
    adapter = adapter_of.get(id(module))
    if adapter is not None and not adapter.merged:
        weight = _merged_weight(adapter, weight)
    column = layout.parallel == "column"
    full = gather_full(weight, layout, 0 if column else 1)
    pieces = row_pieces(kind, full, arch)
    bias = bias_of(module)
    if bias is not None:
        full_bias = gather_full(bias.detach(), layout, 0) if column else bias.detach()
        pieces.update({f"{k}_bias": v for k, v in row_pieces(kind, full_bias, arch).items()})
    pieces.pop("qkv", None)
    pieces.pop("qkv_bias", None)
    return {prefix + k: v for k, v in pieces.items()}


def _model_tensors(
    chunks: Sequence[nn.Module], arch: GPTArch, adapters: TiedLoRAAdapters
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's part of the model as logical tensors (the HF loader's names), gathered over
    TP, with the adapters folded in: (everything but the routed experts, this rank's experts)."""
    adapter_of = {id(base): adapter for adapter, base in _adapted_bases(adapters)}
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    for chunk in map(unwrap, chunks):
        if chunk.pre_process:
            out["embed"] = _vocab_rows(chunk.embedding.word_embeddings.weight, arch)
            if arch.position_embedding_type == "learned_absolute":
                out["pos_embed"] = chunk.embedding.position_embeddings.weight.detach()
        for layer in chunk.decoder.layers:
            out.update(_layer_tensors(layer, arch, adapter_of))
            experts.update(_expert_tensors(layer, arch, adapter_of))
        if chunk.post_process:
            out.update(_norm_tensors(chunk.decoder.final_layernorm, "final_norm"))
            if not arch.tie_embeddings:
                out["lm_head"] = _vocab_rows(chunk.output_layer.weight, arch)
    return out, experts


def export_merged_hf(
    adapters: TiedLoRAAdapters,
    chunks: Sequence[nn.Module],
    base: str | os.PathLike | ExportBase,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    adapter_checkpoint: str | os.PathLike | None = None,
    hf_config: str | os.PathLike | None = None,
) -> Path:
    """Write an HF checkpoint of `base` (see `export_peft`) with the adapters folded in: one
    `model.safetensors` (in the model's dtype), config.json and the tokenizer files (an HF
    directory's own; for a GGUF, transformers' config of it and the job's tokenizer).

    `out_dir` must not be, lie in or contain the base model or the adapter checkpoint;
    `overwrite` replaces only an earlier export (see `export_peft`). The model is not changed
    (ΔW is added to gathered copies). Collective: every rank calls it; every weight is gathered
    to rank 0, which writes.
    """
    resolved = resolve_base(base, hf_config)
    arch = resolved.arch
    protected = _protected(resolved, adapters, adapter_checkpoint)
    final = prepare(out_dir, overwrite, adapters, chunks, arch, protected)
    dtype = unwrap(chunks[0]).config.params_dtype
    dense, experts = _model_tensors(chunks, arch, adapters)
    tensors = {
        **to_rank0(hf_tensors(dense, arch)),
        **to_rank0(hf_tensors(experts, arch), experts=True),
    }

    def write(directory: Path) -> None:
        config = {**resolved.hf_config(), "torch_dtype": str(dtype).removeprefix("torch.")}
        save_safetensors(tensors, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        resolved.write_tokenizer(directory)

    marker = _marker("merged-hf", resolved, resolved.name, protected)
    return write_export(final, write, marker, overwrite)
