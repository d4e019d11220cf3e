"""Fill megatron GPTModel chunks from a pretrained checkpoint, reading only this rank's shard.

Checkpoint readers (safetensors, GGUF) expose a `WeightSource`: tensors under logical names, in
`torch.nn.Linear` orientation ([out, in]), sliced on demand. This module knows megatron's
layouts:

- fused QKV (`linear_qkv`): per query group, [the group's q heads, k, v]; TP splits the rows of
  that whole layout contiguously (so a rank holds whole groups, or, when TP exceeds the number
  of groups, a contiguous part of one group);
- SwiGLU `linear_fc1`: each TP shard is [its gate rows; its up rows];
- row-parallel `linear_proj` / `linear_fc2` split the input columns, their bias is replicated;
- vocabulary-parallel embedding / output layer split (padded) vocabulary rows.

Logical names: `embed`, `pos_embed`, `final_norm[_bias]`, `lm_head`, and per layer `layers.{i}.`
+ `q k v o gate up fc1 down` (weights), `q_bias k_bias v_bias o_bias gate_bias up_bias fc1_bias down_bias`, and
`ln1 ln1_bias ln2 ln2_bias` (the norms before attention and MLP).
"""

from __future__ import annotations

from typing import Protocol

import torch

from tiedlora_megatron.models.arch import GPTArch
from tiedlora_megatron.models.moe import load_moe_mlp, moe_expected_shape


class WeightSource(Protocol):
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a weight (or elements of a vector)."""
        ...

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of a 2-D weight."""
        ...

    def full(self, name: str) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The whole tensor's shape, in [out, in] orientation."""
        ...


def _expected_shape(arch: GPTArch, name: str) -> tuple[int, ...]:
    moe = moe_expected_shape(arch, name)
    if moe is not None:
        return moe
    h, q = arch.hidden_size, arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    ffn = arch.ffn_hidden_size
    part = name.rsplit(".", 1)[-1]
    return {
        "embed": (arch.vocab_size, h),
        "lm_head": (arch.vocab_size, h),
        "pos_embed": (arch.max_position_embeddings, h),
        "q": (q, h),
        "k": (kv, h),
        "v": (kv, h),
        "o": (h, q),
        "gate": (ffn, h),
        "up": (ffn, h),
        "fc1": (ffn, h),
        "down": (h, ffn),
        "q_bias": (q,),
        "k_bias": (kv,),
        "v_bias": (kv,),
        "q_norm": (arch.kv_channels,),
        "k_norm": (arch.kv_channels,),
        "gate_bias": (ffn,),
        "up_bias": (ffn,),
        "fc1_bias": (ffn,),
    }.get(part, (h,))


class _Checked:
    """Checks each tensor's whole shape against the config before any slice is read.

    Slices of a wrongly-shaped tensor can fit one rank's shard, so per-parameter checks alone
    would let some ranks load silently; the whole shape is the same on every rank.
    """

    def __init__(self, src: WeightSource, arch: GPTArch, origin: str):
        self._src, self._arch, self._origin = src, arch, origin
        self._seen: set[str] = set()

    def _check(self, name: str) -> WeightSource:
        if name not in self._seen:
            want, got = _expected_shape(self._arch, name), tuple(self._src.shape(name))
            if got != want:
                raise ValueError(
                    f"{self._origin}: tensor {name!r} has shape {got} but the config implies "
                    f"{want}: the weights do not match the config"
                )
            self._seen.add(name)
        return self._src

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._check(name).rows(name, start, stop)

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._check(name).cols(name, start, stop)

    def full(self, name: str) -> torch.Tensor:
        return self._check(name).full(name)


def _copy(param: torch.Tensor, value: torch.Tensor, what: str, done: set[int]) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(
            f"{what}: checkpoint shard has shape {tuple(value.shape)} but the megatron parameter "
            f"has {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)
    done.add(id(param))


def _qkv_pieces(arch: GPTArch, rank: int, tp: int) -> list[tuple[str, int, int]]:
    """This rank's rows of the fused QKV layout, as (q|k|v, first head, end head) runs."""
    per_group = arch.num_attention_heads // arch.num_query_groups
    units = []  # one per head-sized block of the full fused layout
    for g in range(arch.num_query_groups):
        units += [("q", g * per_group + j) for j in range(per_group)]
        units += [("k", g), ("v", g)]
    per_rank = len(units) // tp
    pieces: list[tuple[str, int, int]] = []
    for kind, head in units[rank * per_rank : (rank + 1) * per_rank]:
        if pieces and pieces[-1][0] == kind and pieces[-1][2] == head:
            pieces[-1] = (kind, pieces[-1][1], head + 1)
        else:
            pieces.append((kind, head, head + 1))
    return pieces


def bias_of(module: torch.nn.Module, name: str = "bias") -> torch.Tensor | None:
    """A layer's bias, or None where it has none: megatron's local layers and norms keep None,
    Transformer Engine's keep an empty tensor."""
    bias = getattr(module, name, None)
    return bias if bias is not None and bias.numel() > 0 else None


def norm_param_names(layer_norm: torch.nn.Module, fused_linear: torch.nn.Module):
    """A norm's (weight, bias): its own module, or TE's norm fused into the next linear."""
    if getattr(layer_norm, "weight", None) is not None:
        return layer_norm.weight, bias_of(layer_norm)
    return fused_linear.layer_norm_weight, bias_of(fused_linear, "layer_norm_bias")


def _load_norm(norm, fused, src: WeightSource, name: str, what: str, done: set[int]) -> None:
    weight, bias = norm_param_names(norm, fused)
    _copy(weight, src.full(name), what, done)
    if bias is not None:
        _copy(bias, src.full(f"{name}_bias"), f"{what} bias", done)


def _vocab_rows(src: WeightSource, name: str, arch: GPTArch, rank: int, tp: int) -> torch.Tensor:
    """This rank's rows of the padded vocabulary; padding rows are zero."""
    per_rank = arch.padded_vocab_size(tp) // tp
    start = rank * per_rank
    out = torch.zeros(per_rank, arch.hidden_size)
    stop = min(start + per_rank, arch.vocab_size)
    if start < stop:
        out[: stop - start] = src.rows(name, start, stop)
    return out


def _load_layer(layer, arch: GPTArch, src: WeightSource, rank: int, tp: int, done: set[int]):
    i = layer.layer_number - 1
    p = f"layers.{i}."
    attn, mlp = layer.self_attention, layer.mlp
    hd = arch.kv_channels
    _load_norm(layer.input_layernorm, attn.linear_qkv, src, p + "ln1", f"layer {i} ln1", done)

    pieces = _qkv_pieces(arch, rank, tp)
    qkv_w = torch.cat([src.rows(p + kind, a * hd, b * hd) for kind, a, b in pieces])
    _copy(attn.linear_qkv.weight, qkv_w, f"layer {i} qkv weight", done)
    if bias_of(attn.linear_qkv) is not None:
        qkv_b = torch.cat([src.rows(f"{p}{kind}_bias", a * hd, b * hd) for kind, a, b in pieces])
        _copy(attn.linear_qkv.bias, qkv_b, f"layer {i} qkv bias", done)

    if arch.qk_layernorm:
        _copy(attn.q_layernorm.weight, src.full(p + "q_norm"), f"layer {i} q norm", done)
        _copy(attn.k_layernorm.weight, src.full(p + "k_norm"), f"layer {i} k norm", done)

    width = arch.num_attention_heads * hd // tp
    _copy(
        attn.linear_proj.weight,
        src.cols(p + "o", rank * width, (rank + 1) * width),
        f"layer {i} attention output weight",
        done,
    )
    if bias_of(attn.linear_proj) is not None:
        _copy(attn.linear_proj.bias, src.full(p + "o_bias"), f"layer {i} o bias", done)

    _load_norm(
        layer.pre_mlp_layernorm, getattr(mlp, "linear_fc1", None), src, p + "ln2",
        f"layer {i} ln2", done,
    )  # fmt: skip
    if arch.num_moe_experts:
        load_moe_mlp(mlp, arch, src, i, rank, tp, lambda t, v, what: _copy(t, v, what, done))
        return
    ffn = arch.ffn_hidden_size // tp
    lo, hi = rank * ffn, (rank + 1) * ffn
    if arch.gated_linear_unit:
        fc1_w = torch.cat([src.rows(p + "gate", lo, hi), src.rows(p + "up", lo, hi)])
    else:
        fc1_w = src.rows(p + "fc1", lo, hi)
    _copy(mlp.linear_fc1.weight, fc1_w, f"layer {i} fc1 weight", done)
    if bias_of(mlp.linear_fc1) is not None:
        if arch.gated_linear_unit:
            fc1_b = torch.cat([src.rows(p + "gate_bias", lo, hi), src.rows(p + "up_bias", lo, hi)])
        else:
            fc1_b = src.rows(p + "fc1_bias", lo, hi)
        _copy(mlp.linear_fc1.bias, fc1_b, f"layer {i} fc1 bias", done)
    _copy(mlp.linear_fc2.weight, src.cols(p + "down", lo, hi), f"layer {i} fc2 weight", done)
    if bias_of(mlp.linear_fc2) is not None:
        _copy(mlp.linear_fc2.bias, src.full(p + "down_bias"), f"layer {i} fc2 bias", done)


def load_weights(chunks: list, arch: GPTArch, src: WeightSource, origin: str) -> None:
    """Copy this rank's shard of every parameter of `chunks` from `src`; fail on any gap.

    `origin` (the checkpoint path) is named in errors.
    """
    from megatron.core import parallel_state as ps

    src = _Checked(src, arch, origin)

    tp = ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    done: set[int] = set()
    for model in chunks:
        if model.pre_process:
            emb = model.embedding
            rows = _vocab_rows(src, "embed", arch, rank, tp)
            _copy(emb.word_embeddings.weight, rows, "token embedding", done)
            if arch.position_embedding_type == "learned_absolute":
                _copy(emb.position_embeddings.weight, src.full("pos_embed"), "positions", done)
        for layer in model.decoder.layers:
            _load_layer(layer, arch, src, rank, tp, done)
        if model.post_process:
            norm = model.decoder.final_layernorm
            _copy(norm.weight, src.full("final_norm"), "final norm", done)
            if bias_of(norm) is not None:
                _copy(norm.bias, src.full("final_norm_bias"), "final norm bias", done)
            if not (arch.tie_embeddings and model.pre_process):
                name = "embed" if arch.tie_embeddings else "lm_head"
                rows = _vocab_rows(src, name, arch, rank, tp)
                _copy(model.output_layer.weight, rows, "output layer", done)
    missed = [
        n
        for model in chunks
        for n, prm in model.named_parameters()
        if id(prm) not in done and prm.numel() > 0
    ]
    if missed:
        raise ValueError(f"parameters not filled from the checkpoint: {missed}")
