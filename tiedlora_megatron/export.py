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
- `export_merged_hf` writes an HF checkpoint (safetensors + config, tokenizer files copied) of the
  base with the adapters folded in, by inverting the HF loader's mapping.

Exports are collective (every rank calls them): TP shards are gathered within their TP group,
pipeline stages are gathered to global rank 0, which writes to a hidden partial directory and
renames it into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.adapter import TiedLoRAAdapter
from tiedlora_megatron.atomic import raise_on_every_rank, replace_dir
from tiedlora_megatron.inject import TiedLoRAAdapters
from tiedlora_megatron.layouts import LinearLayout, describe_linear
from tiedlora_megatron.models.arch import GPTArch
from tiedlora_megatron.models.hf import (
    LLAMA_FAMILY,
    WeightEntry,
    arch_from_hf_config,
    gpt2_weight_names,
    llama_weight_names,
    read_hf_config,
)
from tiedlora_megatron.pipeline import unwrap


class ExportError(ValueError):
    """An adapter or model that cannot be exported as asked, with the reason."""


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


# -- megatron -> HF names ----------------------------------------------------------------------

#: Per family: megatron target -> {HF module (under the layer) -> logical piece of its rows}.
_HF_TARGETS: dict[str, dict[str, dict[str, str]]] = {
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
}
#: Where each target sits in a megatron TransformerLayer.
_TARGET_PATH = re.compile(r"(?:^|\.)decoder\.layers\.\d+\.(?:self_attention|mlp)\.(linear_\w+)$")


def _family(arch: GPTArch) -> str:
    if arch.family in LLAMA_FAMILY:
        return "llama"
    if arch.family == "gpt2":
        return "gpt2"
    raise ExportError(
        f"model family {arch.family!r} has no HF equivalent here; export supports "
        f"{', '.join((*LLAMA_FAMILY, 'gpt2'))}"
    )


def _layer_prefix(arch: GPTArch, index: int) -> str:
    """The HF (…ForCausalLM) module path of decoder layer `index` (0-based)."""
    return f"transformer.h.{index}." if _family(arch) == "gpt2" else f"model.layers.{index}."


def _pieces(kind: str, rows: torch.Tensor, arch: GPTArch) -> dict[str, torch.Tensor]:
    """The logical pieces (q, k, v, qkv, gate, up, ...) of a tensor whose first dim is a megatron
    target's global output rows; `qkv` is HF's fused [q; k; v] order (GPT-2's c_attn)."""
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


def _check_base(chunks: Sequence[nn.Module], arch: GPTArch) -> None:
    """Refuse a model whose megatron dims are not those of `arch` (another base)."""
    config = unwrap(chunks[0]).config
    fields = (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "gated_linear_unit",
    )
    problems = [
        f"{f}: model {getattr(config, f)!r}, HF config {getattr(arch, f)!r}"
        for f in fields
        if getattr(config, f) != getattr(arch, f)
    ]
    if problems:
        raise ExportError(
            "the model does not match the HF base it is exported for:\n  " + "\n  ".join(problems)
        )


def _check_adapters(adapters: TiedLoRAAdapters, chunks: Sequence[nn.Module], arch: GPTArch) -> None:
    _check_base(chunks, arch)
    family = _family(arch)
    bare = [unwrap(c) for c in chunks]
    if len(bare) != len(adapters.chunks) or any(
        a is not b for a, b in zip(bare, (unwrap(c) for c in adapters.chunks), strict=False)
    ):
        raise ExportError("the adapters were applied to other model chunks than the ones given")
    for chunk_adapters in adapters.adapters:
        for name, adapter in chunk_adapters.items():
            match = _TARGET_PATH.search(name)
            if (
                match is None
                or match.group(1) not in _HF_TARGETS[family]
                or adapter.layer_number is None
            ):
                raise ExportError(
                    f"{name}: adapted module has no HF {arch.family} equivalent (exportable are "
                    f"the {', '.join(_HF_TARGETS[family])} of decoder layers)"
                )


# -- gathering ---------------------------------------------------------------------------------


def _gather(local: torch.Tensor, layout: LinearLayout, dim: int) -> torch.Tensor:
    """The global tensor of a TP shard split along `dim` (0: output rows, 1: input columns),
    in megatron's global order (a SwiGLU fc1 is [gate; up] globally, not per shard)."""
    if layout.tp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layout.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=layout.tp_group)
    shape = list(local.shape)
    shape[dim] = layout.out_features if dim == 0 else layout.in_features
    full = local.new_empty(shape)
    for rank, part in enumerate(parts):
        lay = dataclasses.replace(layout, tp_rank=rank)
        if dim == 0:
            full[lay.local_out_index()] = part
        else:
            full[:, lay.local_in_index()] = part
    return full


def _writes() -> bool:
    """Whether this rank's gathered tensors are sent to rank 0 (one copy per pipeline stage)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    return (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    )


def _to_rank0(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All ranks' tensors on global rank 0 (elsewhere: empty)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensors
    mine = tensors if _writes() else {}
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        out.update(part)
    return out


def _agree(error: Exception | None) -> None:
    """Raise on every rank if any rank found a problem (a lone raise would hang the others)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    if error is not None:
        raise error
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise ExportError(first)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _prepare(
    out_dir: str | os.PathLike,
    overwrite: bool,
    adapters: TiedLoRAAdapters,
    chunks: Sequence[nn.Module],
    arch: GPTArch,
) -> tuple[Path, Path]:
    """Check the output directory and the adapters on every rank; raise on all ranks if any
    rank found a problem. Returns (final directory, partial directory to write first)."""
    error = None
    try:
        final = Path(out_dir)
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
        _check_adapters(adapters, chunks, arch)
    except (ExportError, FileExistsError) as e:
        error = e
    _agree(error)
    return final, final.parent / f".{final.name}.partial"


def _write(final: Path, partial: Path, write: Callable[[Path], None]) -> Path:
    """Rank 0 runs `write(partial)` and renames the directory into place; errors reach all."""
    error = None
    if _rank() == 0:
        try:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            write(partial)
            replace_dir(partial, final)
        except Exception as e:  # every rank must learn of it
            error = e
    raise_on_every_rank(error, f"writing {final} failed on rank 0")
    return final


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from tiedlora_megatron.models.hf import require

    require("safetensors", "safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _resolve_arch(arch_or_hf_config: GPTArch | dict | str | os.PathLike) -> tuple[GPTArch, str]:
    """(arch, base model name for PEFT's config) from a GPTArch, an HF config or an HF dir."""
    if isinstance(arch_or_hf_config, GPTArch):
        return arch_or_hf_config, ""
    if isinstance(arch_or_hf_config, dict):
        return arch_from_hf_config(arch_or_hf_config), arch_or_hf_config.get("_name_or_path", "")
    return arch_from_hf_config(read_hf_config(arch_or_hf_config)), str(arch_or_hf_config)


# -- PEFT export -------------------------------------------------------------------------------


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
        return a, _gather(b, lay, 0)
    return _gather(a, lay, 1), b


def _peft_target_modules(adapted: set[str], family: str) -> list[str]:
    """PEFT's target_modules: a module's own name where that picks only adapted modules, its
    qualified name where another HF module shares the name (GPT-2's attn / mlp c_proj)."""
    every = [m for mods in _HF_TARGETS[family].values() for m in mods]
    out = set()
    for module in adapted:
        leaf = module.rsplit(".", 1)[-1]
        clash = any(m not in adapted and m.rsplit(".", 1)[-1] == leaf for m in every)
        out.add(module if clash else leaf)
    return sorted(out)


def export_peft(
    adapters: TiedLoRAAdapters,
    chunks: Sequence[nn.Module],
    arch_or_hf_config: GPTArch | dict | str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write the adapters as an HF PEFT LoRA adapter (one lora_A / lora_B per HF module, scaling
    1) to `out_dir`, for the HF model described by `arch_or_hf_config` (a GPTArch, an HF config
    dict or an HF model directory, which PEFT's config then names as the base).

    Collective: every rank calls it; rank 0 writes. Merged adapters export the same.
    """
    arch, base_name = _resolve_arch(arch_or_hf_config)
    final, partial = _prepare(out_dir, overwrite, adapters, chunks, arch)
    family = _family(arch)
    tensors: dict[str, torch.Tensor] = {}
    adapted: set[str] = set()
    dtype = next(iter(adapters.parameters(trainable_only=False))).dtype
    for chunk_adapters in adapters.adapters:
        for adapter in chunk_adapters.values():
            lora_a, lora_b = _peft_factors(adapter)
            pieces = _pieces(adapter.kind, lora_b, arch)
            prefix = _layer_prefix(arch, adapter.layer_number - 1)
            for module, piece in _HF_TARGETS[family][adapter.kind].items():
                key = f"base_model.model.{prefix}{module}"
                tensors[f"{key}.lora_A.weight"] = lora_a.to(dtype, copy=True)
                tensors[f"{key}.lora_B.weight"] = pieces[piece].to(dtype)
                adapted.add(module)
    tensors = _to_rank0(tensors)
    rank = adapters.config.rank
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name or None,
        "r": rank,
        "lora_alpha": rank,  # scaling 1: s, u and v are already in lora_B
        "lora_dropout": 0.0,
        "target_modules": _peft_target_modules(adapted, family),
        "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D stores [in, out]
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }

    def write(directory: Path) -> None:
        _save_safetensors(tensors, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")

    return _write(final, partial, write)


# -- merged HF export --------------------------------------------------------------------------

#: Files of an HF model directory that describe its tokenizer and generation, copied as they are.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


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
    from tiedlora_megatron.models.weights import bias_of, norm_param_names

    p = f"layers.{layer.layer_number - 1}."
    attn, mlp = layer.self_attention, layer.mlp
    out: dict[str, torch.Tensor] = {}
    for norm, fused, name in (
        (layer.input_layernorm, attn.linear_qkv, "ln1"),
        (layer.pre_mlp_layernorm, mlp.linear_fc1, "ln2"),
    ):
        weight, bias = norm_param_names(norm, fused)
        out[p + name] = weight.detach()
        if bias is not None:
            out[f"{p}{name}_bias"] = bias.detach()
    for kind, module in (
        ("linear_qkv", attn.linear_qkv),
        ("linear_proj", attn.linear_proj),
        ("linear_fc1", mlp.linear_fc1),
        ("linear_fc2", mlp.linear_fc2),
    ):
        layout = describe_linear(module, kind)
        weight = module.weight.detach()
        adapter = adapter_of.get(id(module))
        if adapter is not None and not adapter.merged:
            weight = _merged_weight(adapter, weight)
        column = layout.parallel == "column"
        full = _gather(weight, layout, 0 if column else 1)
        pieces = _pieces(kind, full, arch)
        bias = bias_of(module)
        if bias is not None:
            full_bias = _gather(bias.detach(), layout, 0) if column else bias.detach()
            pieces.update({f"{k}_bias": v for k, v in _pieces(kind, full_bias, arch).items()})
        pieces.pop("qkv", None)
        pieces.pop("qkv_bias", None)
        out.update({p + k: v for k, v in pieces.items()})
    return out


def _model_tensors(
    chunks: Sequence[nn.Module], arch: GPTArch, adapters: TiedLoRAAdapters
) -> dict[str, torch.Tensor]:
    """This rank's part of the model as logical tensors (the HF loader's names), gathered over
    TP, with the adapters folded in."""
    adapter_of = {id(base): adapter for adapter, base in _adapted_bases(adapters)}
    out: dict[str, torch.Tensor] = {}
    for chunk in map(unwrap, chunks):
        if chunk.pre_process:
            out["embed"] = _vocab_rows(chunk.embedding.word_embeddings.weight, arch)
            if arch.position_embedding_type == "learned_absolute":
                out["pos_embed"] = chunk.embedding.position_embeddings.weight.detach()
        for layer in chunk.decoder.layers:
            out.update(_layer_tensors(layer, arch, adapter_of))
        if chunk.post_process:
            out.update(_norm_tensors(chunk.decoder.final_layernorm, "final_norm"))
            if not arch.tie_embeddings:
                out["lm_head"] = _vocab_rows(chunk.output_layer.weight, arch)
    return out


def _hf_tensors(logical: dict[str, torch.Tensor], arch: GPTArch) -> dict[str, torch.Tensor]:
    """Logical tensors under HF names, inverting the loader's map (GPT-2: q, k, v into c_attn,
    Conv1D weights transposed back to [in, out])."""
    names_of = gpt2_weight_names if arch.family == "gpt2" else llama_weight_names
    prefix = "transformer." if arch.family == "gpt2" else "model."
    names = names_of(arch, prefix)
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


def export_merged_hf(
    adapters: TiedLoRAAdapters,
    chunks: Sequence[nn.Module],
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write an HF checkpoint of the base at `hf_dir` with the adapters folded in: one
    `model.safetensors` (in the model's dtype), `hf_dir`'s config.json and its tokenizer files.

    The model is not changed (ΔW is added to gathered copies). Collective: every rank calls it;
    every weight is gathered to rank 0, which writes.
    """
    source = Path(hf_dir)
    hf_config = read_hf_config(source)
    arch = arch_from_hf_config(hf_config)
    final, partial = _prepare(out_dir, overwrite, adapters, chunks, arch)
    dtype = unwrap(chunks[0]).config.params_dtype
    tensors = _to_rank0(_hf_tensors(_model_tensors(chunks, arch, adapters), arch))
    config = {**hf_config, "torch_dtype": str(dtype).removeprefix("torch.")}

    def write(directory: Path) -> None:
        _save_safetensors(tensors, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, directory / name)

    return _write(final, partial, write)
