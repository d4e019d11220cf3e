"""Adapters on megatron-core's tensor-parallel layers against a dense fp64 reference.

For TP in {1, 2, 4}, sequence parallel off and on, column (linear_qkv), gated column (SwiGLU
linear_fc1) and row (linear_proj) layouts, and the lora / vera / vBuA presets with non-zero
random factors: the forward output and the gradients of x, A, B, u and v after megatron's DDP
and `finalize_model_grads` equal a single-process computation that builds ΔW explicitly from the
full tensors. Two layers share the tied factors, so tied gradients are sums over layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.dist import ProcessGroupPool

WORLD = 4
D_IN, FFN, RANK, SEQ, BATCH, LAYERS = 16, 12, 4, 8, 2, 2
KINDS = ("linear_qkv", "linear_fc1", "linear_proj")
PRESETS = ("lora", "vera", "vBuA")


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(WORLD) as p:
        yield p


class _Layer(nn.Module):
    def __init__(self, number: int, kind: str, base: nn.Module):
        super().__init__()
        self.layer_number = number
        self.kind = kind
        setattr(self, kind, base)

    def forward(self, x):
        return getattr(self, self.kind)(x)


class _Model(nn.Module):
    def __init__(self, config, layers):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return [layer(x) for layer in self.layers]


def _rows(full: torch.Tensor, tp: int, rank: int, gated: bool) -> torch.Tensor:
    """This rank's rows of a full d_out-sized tensor, as megatron shards a column layer."""
    if not gated:
        return full.chunk(tp, dim=0)[rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])


def _check_layer(tp: int, sp: bool, kind: str, preset: str) -> dict[str, float]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    rank = ps.get_tensor_model_parallel_rank()
    gated = kind == "linear_fc1"
    column = kind != "linear_proj"
    d_in, d_out = (D_IN, 2 * FFN if gated else 3 * D_IN) if column else (D_IN, D_IN)
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=D_IN,
        num_attention_heads=4,
        ffn_hidden_size=FFN,
        gated_linear_unit=gated,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )
    init = nn.init.zeros_

    def base():
        if column:
            return ColumnParallelLinear(
                d_in, d_out, config=config, init_method=init, bias=True, gather_output=False
            )
        return RowParallelLinear(
            d_in,
            d_out,
            config=config,
            init_method=init,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    model = _Model(config, [_Layer(i + 1, kind, base()) for i in range(LAYERS)])
    cfg = TiedLoRAConfig.preset(preset, rank=RANK, alpha=2 * RANK, target_modules=[kind])
    adapters = apply_tied_lora(model, cfg)

    # Full tensors, the same on every rank.
    g = torch.Generator().manual_seed(1000 * tp + KINDS.index(kind))
    f64 = dict(dtype=torch.float64)
    W = torch.randn(LAYERS, d_out, d_in, generator=g, **f64) / d_in**0.5
    bias = torch.randn(LAYERS, d_out, generator=g, **f64)
    n_ab = 1 if cfg.tied else LAYERS
    A = torch.randn(n_ab, RANK, d_in, generator=g, **f64) / d_in**0.5
    B = torch.randn(n_ab, d_out, RANK, generator=g, **f64) / RANK**0.5
    u = (
        torch.randn(LAYERS, RANK, generator=g, **f64)
        if cfg.uses("u")
        else torch.ones(LAYERS, RANK, **f64)
    )
    v = (
        torch.randn(LAYERS, d_out, generator=g, **f64)
        if cfg.uses("v")
        else torch.ones(LAYERS, d_out, **f64)
    )
    x = torch.randn(SEQ, BATCH, d_in, generator=g, **f64)
    gy = torch.randn(LAYERS, SEQ, BATCH, d_out, generator=g, **f64)

    def out_local(t):  # (..., d_out) full -> this rank's output layout
        if column:
            return _rows(t.movedim(-1, 0), tp, rank, gated).movedim(0, -1)
        return t.chunk(tp, dim=0)[rank] if sp else t

    def in_cols(t):  # (..., d_in) full -> this rank's input features
        return t if column else t.chunk(tp, dim=-1)[rank]

    with torch.no_grad():
        for li, layer in enumerate(model.layers):
            lin = getattr(layer, kind)
            lin.weight.copy_(in_cols(_rows(W[li], tp, rank, gated) if column else W[li]))
            lin.bias.copy_(_rows(bias[li], tp, rank, gated) if column else bias[li])
            ad = adapters.adapters[0][f"layers.{li}.{kind}"]
            j = 0 if cfg.tied else li
            ad.lowrank.A.copy_(in_cols(A[j]))
            ad.lowrank.B.copy_(_rows(B[j], tp, rank, gated) if column else B[j])
            if ad.u is not None:
                ad.u.copy_(u[li])
            if ad.v is not None:
                ad.v.copy_(_rows(v[li], tp, rank, gated) if column else v[li])

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    ddp.zero_grad_buffer()
    x_local = x.float()
    if column and sp:
        x_local = x_local.chunk(tp, dim=0)[rank]
    x_local = in_cols(x_local).clone().requires_grad_(True)
    outs = ddp(x_local)
    loss = sum((o * out_local(gy[li]).float()).sum() for li, (o, _) in enumerate(outs))
    loss.backward()
    finalize_model_grads([ddp])

    # Dense reference.
    ref = {k: t.clone().requires_grad_(True) for k, t in dict(A=A, B=B, u=u, v=v, x=x).items()}
    ys = []
    for li in range(LAYERS):
        j = 0 if cfg.tied else li
        delta_w = (
            cfg.scaling
            * ref["v"][li][:, None]
            * ref["B"][j]
            @ (ref["u"][li][:, None] * ref["A"][j])
        )
        y = ref["x"] @ (W[li] + delta_w).T
        ys.append(y + bias[li] if column else y)
    sum((y * gy[li]).sum() for li, y in enumerate(ys)).backward()

    def err(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))

    errors = {}
    for li, (o, b) in enumerate(outs):
        errors[f"out{li}"] = err(o, out_local(ys[li].detach()))
        if not column:
            errors[f"bias{li}"] = err(b, bias[li])
    x_grad_ref = ref["x"].grad
    if column and sp:
        x_grad_ref = x_grad_ref.chunk(tp, dim=0)[rank]
    errors["x"] = err(x_local.grad, in_cols(x_grad_ref))
    for li, layer in enumerate(model.layers):
        ad = adapters.adapters[0][f"layers.{li}.{kind}"]
        j = 0 if cfg.tied else li
        want = {
            "A": in_cols(ref["A"].grad[j]),
            "B": _rows(ref["B"].grad[j], tp, rank, gated) if column else ref["B"].grad[j],
            "u": ref["u"].grad[li],
            "v": _rows(ref["v"].grad[li], tp, rank, gated) if column else ref["v"].grad[li],
        }
        params = {"A": ad.lowrank.A, "B": ad.lowrank.B, "u": ad.u, "v": ad.v}
        for f, p in params.items():
            if p is None:
                continue
            if not cfg.trains(f):
                assert not p.requires_grad and getattr(p, "main_grad", None) is None, f
                continue
            errors[f"d{f}{li}"] = err(p.main_grad, want[f])
        assert getattr(layer, kind).weight.grad is None
    return errors


def _layer_grid(tp: int, sp: bool) -> list[tuple[str, str, dict[str, float]]]:
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        return [(k, p, _check_layer(tp, sp, k, p)) for k in KINDS for p in PRESETS]
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (4, False), (4, True)])
def test_layers_match_dense_reference(pool, tp, sp):
    for rank, cases in enumerate(pool.run(_layer_grid, tp, sp)):
        for kind, preset, errors in cases:
            bad = {k: e for k, e in errors.items() if not e < 1e-5}
            assert not bad, f"rank {rank}, {kind}, {preset}: relative errors {bad}"
            assert any(k.startswith("dA") or k.startswith("du") for k in errors)
