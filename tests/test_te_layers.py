"""The adapter's numerics on megatron-core's Transformer Engine layers, without TE.

TE cannot be installed on CPU machines. tests/test_te_contract.py checks the TE path's pieces
against megatron-core's own TE source without any stand-in; this module checks what those pieces
add up to - the adapter's outputs and gradients through its forward hook, tensor-parallel
communication included - on layers that emulate TE's contract: classes with the names
and module of megatron-core's TE wrappers (which is how the adapter recognises them) that
emulate TE's `Linear` / `LayerNormLinear` under megatron's wrapper exactly as documented in
`tiedlora_megatron.te` and `layouts.split_output`: the same sharding, tensor-parallel
communication (megatron's own mappings), return forms with and without `return_bias` and
`return_layernorm_output`, and the gradient of the returned norm output added to the layer's
input gradient after the layer's own reduction. They compute a dense layer norm + linear in fp32.

Against a dense fp64 reference, at TP 1 and 2 with and without sequence parallel: the output and
the gradients of x, A, B, u and v equal those of `(W + ΔW) · LN(x) + bias` (norm-fused layer) or
`(W + ΔW) · x + bias`, for every TE layer and return form, and the caller gets the return form
the layer had before it was adapted. Unsupported TE layers and versions raise clear errors.
What only real TE on a GPU can show is checked by tests/gpu/check_te.py.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from packaging.version import Version
from torch import nn

from tests.dist import ProcessGroupPool
from tests.test_adapter_layers import _Layer, _Model, _rows

WORLD = 2
D_IN, FFN, RANK, SEQ, BATCH, LAYERS = 16, 12, 4, 8, 2, 2
TE_MODULE = "megatron.core.extensions.transformer_engine"
SUPPORTED_VERSION = Version("2.9.0")

# (TE layer, target kind, megatron's te_return_bias): every layer with both of its return forms.
CASES = (
    ("TELayerNormColumnParallelLinear", "linear_qkv", False),
    ("TELayerNormColumnParallelLinear", "linear_fc1", True),
    ("TEColumnParallelLinear", "linear_qkv", True),
    ("TEColumnParallelLinear", "linear_fc1", False),
    ("TERowParallelLinear", "linear_proj", False),
    ("TERowParallelLinear", "linear_fc2", True),
)
PRESETS = ("vBuA", "lora")


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(WORLD) as p:
        yield p


class _FakeTELayer(nn.Module):
    """TE's Linear (`norm=False`) or LayerNormLinear (`norm=True`) inside megatron's wrapper."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        parallel_mode: str | None,
        bias: bool = True,
        skip_bias_add: bool = False,
        norm: bool = False,
    ):
        super().__init__()
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
        self.config = config
        self.parallel_mode = parallel_mode
        self.tp_group = group
        self.tp_size = torch.distributed.get_world_size(group) if group is not None else 1
        self.sequence_parallel = config.sequence_parallel
        # Like TE: the split side is this rank's shard.
        tp = self.tp_size
        self.in_features = input_size // tp if parallel_mode == "row" else input_size
        self.out_features = output_size // tp if parallel_mode == "column" else output_size
        self.te_return_bias = skip_bias_add and bias  # megatron's; TE's return_bias
        self.weight = nn.Parameter(torch.zeros(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.norm = norm
        if norm:
            self.layer_norm_weight = nn.Parameter(torch.ones(input_size))
            self.layer_norm_bias = nn.Parameter(torch.zeros(input_size))
            self.return_layernorm_output = False
            self.return_layernorm_output_gathered = False

    def te_forward(self, inp: torch.Tensor):
        """TE's module forward: its communication and return forms."""
        from megatron.core.tensor_parallel import mappings

        group, sp = self.tp_group, self.sequence_parallel
        ln = inp
        if self.norm:
            ln = F.layer_norm(inp, (inp.shape[-1],), self.layer_norm_weight, self.layer_norm_bias)
        total = ln
        if self.parallel_mode == "column" and self.tp_size > 1:
            if sp:
                total = mappings.gather_from_sequence_parallel_region(
                    ln, tensor_parallel_output_grad=True, group=group
                )
            else:
                total = mappings.copy_to_tensor_model_parallel_region(ln, group=group)
        out = F.linear(total, self.weight)
        if self.parallel_mode == "row" and self.tp_size > 1:
            if sp:
                out = mappings.reduce_scatter_to_sequence_parallel_region(out, group=group)
            else:
                out = mappings.reduce_from_tensor_model_parallel_region(out, group=group)
        if self.bias is not None and not self.te_return_bias:
            out = out + self.bias
        norm_out = (ln,) if self.norm and self.return_layernorm_output else ()
        if self.te_return_bias:
            return (out, self.bias, *norm_out)
        return (out, *norm_out) if norm_out else out

    def forward(self, x: torch.Tensor):
        """megatron-core's wrapper forward: TE's return value, with a None bias appended unless
        TE returned its bias."""
        out = self.te_forward(x)
        return out if self.te_return_bias else (out, None)


class TELayerNormColumnParallelLinear(_FakeTELayer):
    def __init__(self, input_size, output_size, **kwargs):
        super().__init__(input_size, output_size, parallel_mode="column", norm=True, **kwargs)


class TEColumnParallelLinear(_FakeTELayer):
    def __init__(self, input_size, output_size, **kwargs):
        kwargs.setdefault("parallel_mode", "column")
        super().__init__(input_size, output_size, **kwargs)


class TERowParallelLinear(_FakeTELayer):
    def __init__(self, input_size, output_size, **kwargs):
        super().__init__(input_size, output_size, parallel_mode="row", **kwargs)


class TELinear(_FakeTELayer):
    def __init__(self, input_size, output_size, **kwargs):
        super().__init__(input_size, output_size, parallel_mode=None, **kwargs)


class TEGroupedLinear(nn.Module):
    def __init__(self, *_args, **_kwargs):
        super().__init__()
        self.weight0 = nn.Parameter(torch.zeros(D_IN, D_IN))


FAKES = {
    cls.__name__: cls
    for cls in (
        TELayerNormColumnParallelLinear,
        TEColumnParallelLinear,
        TERowParallelLinear,
        TELinear,
        TEGroupedLinear,
    )
}
for _cls in FAKES.values():
    _cls.__module__ = TE_MODULE


def _config(tp: int = 1, sp: bool = False, gated: bool = False):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
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


def _dims(kind: str) -> tuple[int, int]:
    return {
        "linear_qkv": (D_IN, 3 * D_IN),
        "linear_fc1": (D_IN, 2 * FFN),
        "linear_proj": (D_IN, D_IN),
        "linear_fc2": (FFN, D_IN),
    }[kind]


def _form(output) -> tuple | str:
    """The structure of a return value: types, nested."""
    if isinstance(output, tuple):
        return tuple(_form(o) for o in output)
    return type(output).__name__


def _check_case(
    tp: int, sp: bool, layer: str, kind: str, return_bias: bool, preset: str
) -> dict[str, float]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    rank = ps.get_tensor_model_parallel_rank()
    gated = kind == "linear_fc1"
    column = layer != "TERowParallelLinear"
    norm = layer == "TELayerNormColumnParallelLinear"
    d_in, d_out = _dims(kind)
    config = _config(tp, sp, gated)
    bases = [
        FAKES[layer](d_in, d_out, config=config, bias=True, skip_bias_add=return_bias)
        for _ in range(LAYERS)
    ]
    model = _Model(config, [_Layer(i + 1, kind, b) for i, b in enumerate(bases)])

    g = torch.Generator().manual_seed(100 * tp + 10 * CASES.index((layer, kind, return_bias)))
    f64 = dict(dtype=torch.float64)
    W = torch.randn(LAYERS, d_out, d_in, generator=g, **f64) / d_in**0.5
    bias = torch.randn(LAYERS, d_out, generator=g, **f64)
    gamma = 1 + 0.5 * torch.randn(LAYERS, d_in, generator=g, **f64)
    beta = 0.5 * torch.randn(LAYERS, d_in, generator=g, **f64)
    x = torch.randn(SEQ, BATCH, d_in, generator=g, **f64)
    gy = torch.randn(LAYERS, SEQ, BATCH, d_out, generator=g, **f64)

    def out_local(t):  # (..., d_out) full -> this rank's output layout
        if column:
            return _rows(t.movedim(-1, 0), tp, rank, gated).movedim(0, -1)
        return t.chunk(tp, dim=0)[rank] if sp else t

    def in_local(t):  # (seq, batch, d_in) full -> this rank's input
        if column:
            return t.chunk(tp, dim=0)[rank] if sp else t
        return t.chunk(tp, dim=-1)[rank]

    def in_cols(t):
        return t if column else t.chunk(tp, dim=-1)[rank]

    with torch.no_grad():
        for li, base in enumerate(bases):
            base.weight.copy_(in_cols(_rows(W[li], tp, rank, gated) if column else W[li]))
            base.bias.copy_(_rows(bias[li], tp, rank, gated) if column else bias[li])
            if norm:
                base.layer_norm_weight.copy_(gamma[li])
                base.layer_norm_bias.copy_(beta[li])
        before = [_form(b(in_local(x).float())) for b in bases]

    cfg = TiedLoRAConfig.preset(preset, rank=RANK, alpha=2 * RANK, target_modules=[kind])
    adapters = apply_tied_lora(model, cfg)
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
    ads = [adapters.adapters[0][f"layers.{li}.{kind}"] for li in range(LAYERS)]
    with torch.no_grad():
        for li, ad in enumerate(ads):
            j = 0 if cfg.tied else li
            ad.lowrank.A.copy_(in_cols(A[j]))
            ad.lowrank.B.copy_(_rows(B[j], tp, rank, gated) if column else B[j])
            if ad.u is not None:
                ad.u.copy_(u[li])
            if ad.v is not None:
                ad.v.copy_(_rows(v[li], tp, rank, gated) if column else v[li])
    assert all(getattr(b, "return_layernorm_output", False) == norm for b in bases)

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    ddp.zero_grad_buffer()
    x_local = in_local(x.float()).clone().requires_grad_(True)
    outs = ddp(x_local)
    assert [_form(o) for o in outs] == before, (before, [_form(o) for o in outs])
    loss = sum((o * out_local(gy[li]).float()).sum() for li, (o, _) in enumerate(outs))
    loss.backward()
    finalize_model_grads([ddp])

    # Dense reference: the whole layer, adapted, on the full tensors.
    ref = {k: t.clone().requires_grad_(True) for k, t in dict(A=A, B=B, u=u, v=v, x=x).items()}
    ys = []
    for li in range(LAYERS):
        j = 0 if cfg.tied else li
        delta_w = (
            cfg.scaling
            * (ref["v"][li][:, None] * ref["B"][j])
            @ (ref["u"][li][:, None] * ref["A"][j])
        )
        h = ref["x"]
        if norm:
            h = F.layer_norm(h, (d_in,), gamma[li], beta[li])
        y = h @ (W[li] + delta_w).T
        ys.append(y if return_bias else y + bias[li])
    sum((y * gy[li]).sum() for li, y in enumerate(ys)).backward()

    def err(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))

    errors = {}
    for li, (o, b) in enumerate(outs):
        errors[f"out{li}"] = err(o, out_local(ys[li].detach()))
        if return_bias:
            errors[f"bias{li}"] = err(b, _rows(bias[li], tp, rank, gated) if column else bias[li])
    errors["x"] = err(x_local.grad, in_local(ref["x"].grad))
    for li, ad in enumerate(ads):
        j = 0 if cfg.tied else li
        want = {
            "A": in_cols(ref["A"].grad[j]),
            "B": _rows(ref["B"].grad[j], tp, rank, gated) if column else ref["B"].grad[j],
            "u": ref["u"].grad[li] if cfg.uses("u") else None,
            "v": (_rows(ref["v"].grad[li], tp, rank, gated) if column else ref["v"].grad[li])
            if cfg.uses("v")
            else None,
        }
        for f, p in {"A": ad.lowrank.A, "B": ad.lowrank.B, "u": ad.u, "v": ad.v}.items():
            if p is not None and cfg.trains(f):
                errors[f"d{f}{li}"] = err(p.main_grad, want[f])
        assert bases[li].weight.grad is None

    # Detached, the layers return their own forms again.
    adapters.detach()
    assert not any(getattr(b, "return_layernorm_output", False) for b in bases)
    with torch.no_grad():
        assert [_form(b(x_local.detach())) for b in bases] == before
    return errors


def _te_grid(tp: int, sp: bool) -> list[tuple[tuple, dict[str, float]]]:
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        with mock.patch("tiedlora_megatron.te.te_version", return_value=SUPPORTED_VERSION):
            return [
                ((*case, preset), _check_case(tp, sp, *case, preset))
                for case in CASES
                for preset in PRESETS
            ]
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_te_layers_match_dense_reference(pool, tp, sp):
    for rank, cases in enumerate(pool.run(_te_grid, tp, sp)):
        for case, errors in cases:
            bad = {k: e for k, e in errors.items() if not e < 1e-5}
            assert not bad, f"rank {rank}, {case}: relative errors {bad}"
            assert any(k.startswith("dA") for k in errors)


# -- refusals (one process, TP = 1) -------------------------------------------------------------


def _adapt(layer: str, kind: str = "linear_qkv", version: Version | None = SUPPORTED_VERSION, **kw):
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    config = _config()
    base = FAKES[layer](*_dims(kind), config=config, **kw)
    model = _Model(config, [_Layer(1, kind, base)])
    cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, target_modules=[kind])
    with mock.patch("tiedlora_megatron.te.te_version", return_value=version):
        return base, apply_tied_lora(model, cfg)


@pytest.mark.parametrize(
    "layer,kw,match",
    [
        ("TEGroupedLinear", {}, "grouped \\(MoE expert\\) layers are not supported"),
        ("TELinear", {}, "not a tensor-parallel column or row layer"),
        ("TEColumnParallelLinear", {"parallel_mode": None}, "parallel_mode=None"),
    ],
)
def test_unsupported_te_layers_raise(layer, kw, match):
    from tiedlora_megatron.layouts import UnsupportedLayerError

    with pytest.raises(UnsupportedLayerError, match=match):
        _adapt(layer, **kw)


@pytest.mark.parametrize(
    "version,match",
    [(None, "Transformer Engine is not installed"), (Version("1.13.0"), "1.13.0 is not supported")],
)
def test_missing_or_old_te_raises(version, match):
    from tiedlora_megatron.te import TransformerEngineUnavailableError

    with pytest.raises(TransformerEngineUnavailableError, match=match):
        _adapt("TERowParallelLinear", "linear_proj", version=version)


def test_layer_already_returning_its_norm_output_is_refused():
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.layouts import UnsupportedLayerError

    config = _config()
    base = TELayerNormColumnParallelLinear(*_dims("linear_qkv"), config=config)
    base.return_layernorm_output = True
    cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, target_modules=["linear_qkv"])
    with (
        mock.patch("tiedlora_megatron.te.te_version", return_value=SUPPORTED_VERSION),
        pytest.raises(UnsupportedLayerError, match="already returns its norm's output"),
    ):
        apply_tied_lora(_Model(config, [_Layer(1, "linear_qkv", base)]), cfg)


def test_hook_called_without_forward_is_refused():
    """megatron's TEFusedMLP calls its layers' forward hooks as hook(module, None, None)."""
    from tiedlora_megatron.layouts import UnsupportedLayerError

    base, _ = _adapt("TELayerNormColumnParallelLinear", "linear_fc1")
    (hook,) = base._forward_hooks.values()
    with pytest.raises(UnsupportedLayerError, match="TEFusedMLP"):
        hook(base, None, None)
