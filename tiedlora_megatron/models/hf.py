"""HF checkpoints (config.json + safetensors) of the Llama family and GPT-2 -> megatron GPTModel.

Each rank opens the safetensors files lazily (`safe_open`) and reads only the slices its TP /
PP shard needs. GPT-2 stores its linears as `Conv1D` ([in, out]) and q/k/v fused in `c_attn`;
the source presents them as [out, in] views, so the megatron-layout code sees one format.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tiedlora_megatron.models.arch import GPTArch, LayerSpec, ModelInfo, build_model
from tiedlora_megatron.models.moe import MOE_MODEL_TYPES, moe_arch_fields, moe_weight_names

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = (*LLAMA_FAMILY, "gpt2", *MOE_MODEL_TYPES)

_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def require(module: str, pip_name: str):
    """Import an optional dependency, or say which pip package provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed to load pretrained models: pip install {pip_name} "
            f"(or tiedlora_megatron[models])"
        ) from e


def model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path does not exist: {p}")
    if not p.is_dir():
        raise NotADirectoryError(f"expected an HF model directory, got a file: {p}")
    return p


def read_hf_config(path: str | os.PathLike) -> dict:
    p = model_dir(path) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json in {p.parent}: not an HF model directory")
    with open(p) as f:
        return json.load(f)


def _activation(name: str, model_type: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"{model_type}: unsupported activation {name!r}")
    return _HF_ACTIVATIONS[name]


def _rope_scaling_factor(cfg: dict) -> float | None:
    """Llama-3 RoPE scaling is what megatron implements; other kinds would silently differ."""
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    if (
        kind == "llama3"
        and all(float(scaling.get(k, v)) == v for k, v in expected.items())
        and int(scaling.get("original_max_position_embeddings", 8192)) == 8192
    ):
        return float(scaling["factor"])
    if kind == "default":
        return None
    raise ValueError(
        f"unsupported rope_scaling {scaling}: only llama3 scaling with low_freq_factor=1, "
        "high_freq_factor=4, original_max_position_embeddings=8192 is implemented by megatron"
    )


def _llama_arch(cfg: dict) -> GPTArch:
    model_type = cfg["model_type"]
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise ValueError(f"{model_type} with use_sliding_window=true is not supported")
    if model_type == "qwen2":
        qkv_bias, linear_bias = True, False
    else:
        attn_bias, mlp_bias = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
        if attn_bias != mlp_bias:
            raise ValueError(
                f"{model_type}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not "
                "expressible in megatron (biases are on all linears or only on q/k/v)"
            )
        qkv_bias, linear_bias = False, attn_bias
    max_pos = cfg.get("max_position_embeddings", 4096)
    window = cfg.get("sliding_window") if model_type == "mistral" else None
    if window:
        # Within the window, sliding-window attention is plain causal attention; the
        # evaluation helpers refuse longer sequences.
        max_pos = min(max_pos, window)
    return GPTArch(
        family=model_type,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or hidden // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=max_pos,
        normalization="RMSNorm",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation=_activation(cfg.get("hidden_act", "silu"), model_type),
        position_embedding_type="rope",
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        add_bias_linear=linear_bias,
        add_qkv_bias=qkv_bias,
        rotary_base=float(cfg.get("rope_theta", 10000.0)),
        rotary_percent=float(cfg.get("partial_rotary_factor", 1.0)),
        rope_scaling_factor=_rope_scaling_factor(cfg),
        qk_layernorm=model_type == "qwen3",
    )


def _gpt2_arch(cfg: dict) -> GPTArch:
    if cfg.get("scale_attn_by_inverse_layer_idx") or not cfg.get("scale_attn_weights", True):
        raise ValueError(
            "gpt2 with scale_attn_by_inverse_layer_idx=true or scale_attn_weights=false "
            "is not supported"
        )
    hidden, heads = cfg["n_embd"], cfg["n_head"]
    return GPTArch(
        family="gpt2",
        num_layers=cfg["n_layer"],
        hidden_size=hidden,
        ffn_hidden_size=cfg.get("n_inner") or 4 * hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=hidden // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["n_positions"],
        normalization="LayerNorm",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        gated_linear_unit=False,
        activation=_activation(cfg.get("activation_function", "gelu_new"), "gpt2"),
        position_embedding_type="learned_absolute",
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        add_bias_linear=True,
        add_qkv_bias=True,
    )


def arch_from_hf_config(cfg: dict) -> GPTArch:
    model_type = cfg.get("model_type")
    if model_type in LLAMA_FAMILY:
        return _llama_arch(cfg)
    if model_type == "gpt2":
        return _gpt2_arch(cfg)
    if model_type in MOE_MODEL_TYPES:  # a Llama-family attention with MoE MLPs
        dense = _llama_arch({**cfg, "model_type": MOE_MODEL_TYPES[model_type]})
        return dataclasses.replace(dense, family=model_type, **moe_arch_fields(cfg))
    raise ValueError(
        f"unsupported architecture: model_type={model_type!r} "
        f"(architectures={cfg.get('architectures')}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


@dataclass(frozen=True)
class WeightEntry:
    """Where a logical tensor lives: a stored tensor, maybe transposed, maybe an out-range of it."""

    tensor: str
    transposed: bool = False
    offset: int = 0
    size: int | None = None


def llama_weight_names(arch: GPTArch, prefix: str) -> dict[str, WeightEntry]:
    names = {
        "embed": WeightEntry(f"{prefix}embed_tokens.weight"),
        "final_norm": WeightEntry(f"{prefix}norm.weight"),
        "lm_head": WeightEntry("lm_head.weight"),
    }
    parts = {
        "ln1": "input_layernorm",
        "ln2": "post_attention_layernorm",
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "q_norm": "self_attn.q_norm",
        "k_norm": "self_attn.k_norm",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    for i in range(arch.num_layers):
        for short, hf in parts.items():
            base = f"{prefix}layers.{i}.{hf}"
            names[f"layers.{i}.{short}"] = WeightEntry(f"{base}.weight")
            names[f"layers.{i}.{short}_bias"] = WeightEntry(f"{base}.bias")
    return names


def gpt2_weight_names(arch: GPTArch, prefix: str) -> dict[str, WeightEntry]:
    h = arch.hidden_size
    names = {
        "embed": WeightEntry(f"{prefix}wte.weight"),
        "pos_embed": WeightEntry(f"{prefix}wpe.weight"),
        "final_norm": WeightEntry(f"{prefix}ln_f.weight"),
        "final_norm_bias": WeightEntry(f"{prefix}ln_f.bias"),
        "lm_head": WeightEntry("lm_head.weight"),
    }
    for i in range(arch.num_layers):
        b = f"{prefix}h.{i}."
        layer = {
            "ln1": WeightEntry(b + "ln_1.weight"),
            "ln1_bias": WeightEntry(b + "ln_1.bias"),
            "ln2": WeightEntry(b + "ln_2.weight"),
            "ln2_bias": WeightEntry(b + "ln_2.bias"),
            "o": WeightEntry(b + "attn.c_proj.weight", transposed=True),
            "o_bias": WeightEntry(b + "attn.c_proj.bias"),
            "fc1": WeightEntry(b + "mlp.c_fc.weight", transposed=True),
            "fc1_bias": WeightEntry(b + "mlp.c_fc.bias"),
            "down": WeightEntry(b + "mlp.c_proj.weight", transposed=True),
            "down_bias": WeightEntry(b + "mlp.c_proj.bias"),
        }
        for j, kind in enumerate("qkv"):
            layer[kind] = WeightEntry(b + "attn.c_attn.weight", True, j * h, h)
            layer[f"{kind}_bias"] = WeightEntry(b + "attn.c_attn.bias", False, j * h, h)
        names.update({f"layers.{i}.{k}": e for k, e in layer.items()})
    return names


class SafetensorsSource:
    """Lazily sliced tensors of an HF safetensors checkpoint, under the logical names."""

    def __init__(self, path: Path, arch: GPTArch):
        require("safetensors", "safetensors")
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            with open(index) as f:
                self._file_of = dict(json.load(f)["weight_map"])
        elif (path / "model.safetensors").is_file():
            self._file_of = None
        else:
            others = sorted(p.name for p in path.glob("*.bin")) or "none"
            raise FileNotFoundError(
                f"no safetensors weights (model.safetensors or model.safetensors.index.json) in "
                f"{path}; other weight files: {others}. Re-save with safe_serialization=True."
            )
        self._handles: dict[str, object] = {}
        if self._file_of is None:
            stored = set(self._open("model.safetensors").keys())
        else:
            stored = set(self._file_of)
        base = gpt2_weight_names if arch.family == "gpt2" else llama_weight_names
        key = "wte.weight" if arch.family == "gpt2" else "embed_tokens.weight"
        prefix = next((p for p in ("model.", "transformer.", "") if p + key in stored), None)
        if prefix is None:
            raise ValueError(f"{path}: no {key} tensor; is this a {arch.family} checkpoint?")
        self._names = base(arch, prefix)
        if arch.num_moe_experts:
            self._names.update(moe_weight_names(arch, prefix))
        self._stored = stored

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file]

    def _entry(self, name: str) -> WeightEntry:
        entry = self._names.get(name)
        if entry is None or entry.tensor not in self._stored:
            missing = entry.tensor if entry else name
            raise KeyError(f"{self.path}: checkpoint has no tensor {missing!r}")
        return entry

    def _slice(self, entry: WeightEntry):
        file = "model.safetensors" if self._file_of is None else self._file_of[entry.tensor]
        return self._open(file).get_slice(entry.tensor)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        e = self._entry(name)
        s = self._slice(e)
        a, b = e.offset + start, e.offset + stop
        if e.transposed:
            return s[:, a:b].T
        return s[a:b]

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        e = self._entry(name)
        s = self._slice(e)
        if e.transposed:
            end = e.offset + (e.size or s.get_shape()[1])
            return s[start:stop, e.offset : end].T
        return s[:, start:stop]

    def shape(self, name: str) -> tuple[int, ...]:
        e = self._entry(name)
        shape = list(self._slice(e).get_shape())
        if e.transposed:
            shape.reverse()
        if e.size is not None:
            shape[0] = e.size
        return tuple(shape)

    def full(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])


def load_hf_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    config_overrides: dict[str, Any] | None = None,
    spec: LayerSpec = "local",
):
    """Build this rank's megatron chunks for an HF checkpoint directory (on megatron-core's
    `spec`) and load its weights.

    Returns (chunks, info); TP / PP / virtual-PP sizes come from megatron's parallel_state.
    """
    from tiedlora_megatron.models.weights import load_weights

    p = model_dir(path)
    arch = arch_from_hf_config(read_hf_config(p))
    src = SafetensorsSource(p, arch)
    chunks = build_model(arch, dtype, config_overrides=config_overrides, spec=spec)
    load_weights(chunks, arch, src, str(p))
    return chunks, ModelInfo(arch=arch, path=str(p), format="hf")
