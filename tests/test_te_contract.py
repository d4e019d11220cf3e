"""The Transformer Engine path's TE-independent pieces, checked without TE and without stand-ins.

The reference is megatron-core's own TE wrapper module,
`megatron/core/extensions/transformer_engine.py`, read as source with `ast` (importing it needs
TE): which classes it defines and what they derive from, the `parallel_mode` each wrapper gives
TE, and what its `forward` returns. Against it:
- layer recognition by type (`te.te_class_in_mro`): every TE linear wrapper megatron-core defines
  is either adapted or refused by name, subclasses included, same-named foreign classes not;
- layout choice (`layouts.te_layout_fields`): column or row as megatron-core sets it, global sizes
  from TE's local ones at TP 1, 2 and 4 (hand-derived), and every refusal;
- return-value normalisation (`layouts.split_output`): every return form TE's `Linear` and
  `LayerNormLinear` produce under megatron-core's wrapper is split into the same tensor objects.
  The wrapper's half of each form is read from megatron-core's source; TE's half (what its
  modules' `forward` returns) is transcribed from TE 2.x's source, which cannot be imported here.
What needs TE itself is in tests/gpu/check_te.py; tests/test_te_layers.py checks the adapter's
numerics on layers that reproduce TE's documented contract.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import torch

from tiedlora_megatron import te
from tiedlora_megatron.layouts import UnsupportedLayerError, split_output, te_layout_fields

# TE's own module classes megatron-core's wrappers derive from, as its source names them.
TE_LINEAR_BASES = {"te.pytorch.Linear", "te.pytorch.LayerNormLinear", "te.pytorch.GroupedLinear"}


def _megatron_source(relative: str) -> ast.Module:
    """The syntax tree of the installed megatron-core's `megatron/core/<relative>`, unimported."""
    spec = importlib.util.find_spec("megatron.core")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / relative
    return ast.parse(path.read_text(), str(path))


@cache
def _megatron_te_classes() -> dict[str, ast.ClassDef]:
    """Every class megatron-core's TE wrapper module defines (including those it defines only
    for some TE versions), by name."""
    tree = _megatron_source("extensions/transformer_engine.py")
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


def _mro(name: str) -> list[tuple[str, str]]:
    """(module, qualified name) of megatron-core's class `name` and its ancestors, ending with
    the first class defined outside the TE wrapper module (e.g. TE's `te.pytorch.Linear`)."""
    classes, chain = _megatron_te_classes(), []
    while name in classes:
        chain.append((te.TE_WRAPPER_MODULE, name))
        bases = classes[name].bases
        if not bases:
            return chain
        assert len(bases) == 1, f"{name}: multiple inheritance is not expected here"
        name = ast.unparse(bases[0])
    return [*chain, ("transformer_engine", name)]


def _te_linear_wrappers() -> dict[str, str]:
    """megatron-core's TE linear wrappers: name -> the TE module class they end in."""
    out = {}
    for name in _megatron_te_classes():
        root = _mro(name)[-1][1]
        if root in TE_LINEAR_BASES:
            out[name] = root
    return out


def _super_init_parallel_mode(name: str):
    """The `parallel_mode=` that class `name`'s `__init__` passes to `super().__init__`."""
    init = next(
        n
        for n in _megatron_te_classes()[name].body
        if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    )
    for node in ast.walk(init):
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) == "super().__init__"
            and any(k.arg == "parallel_mode" for k in node.keywords)
        ):
            value = next(k.value for k in node.keywords if k.arg == "parallel_mode")
            return (
                ast.literal_eval(value) if isinstance(value, ast.Constant) else ast.unparse(value)
            )
    raise AssertionError(f"{name}.__init__ passes no parallel_mode to super().__init__")


# -- layer recognition --------------------------------------------------------------------------


# TE wrappers that megatron-core added after 0.16 (te.py names them for the releases that have
# them; older ones simply never build them).
ADDED_AFTER_0_16 = {"TELMHeadColumnParallelLinear"}


def test_megatron_defines_every_te_class_named_here():
    classes = _megatron_te_classes()
    named = {*te.SUPPORTED_TE_LAYERS, *te.UNSUPPORTED_TE_LAYERS, te.FUSED_TE_MLP}
    assert named - ADDED_AFTER_0_16 <= classes.keys(), named - classes.keys()


def test_every_megatron_te_linear_wrapper_is_adapted_or_refused_by_name():
    wrappers = _te_linear_wrappers()
    # The ones megatron-core 0.16 defines, found from the source rather than listed by hand.
    assert {"TELinear", "TELayerNormColumnParallelLinear", "TEGroupedLinear"} <= wrappers.keys()
    known = te.SUPPORTED_TE_LAYERS.keys() | te.UNSUPPORTED_TE_LAYERS.keys()
    for name in wrappers:
        assert te.te_class_in_mro(_mro(name), known) == name, name


def test_recognition_follows_subclasses_and_ignores_foreign_classes():
    known = te.SUPPORTED_TE_LAYERS.keys() | te.UNSUPPORTED_TE_LAYERS.keys()
    # megatron's TEColumnParallelLinear derives from TELinear: the most derived one counts.
    column = _mro("TEColumnParallelLinear")
    assert column[1] == (te.TE_WRAPPER_MODULE, "TELinear")
    assert te.te_class_in_mro(column, known) == "TEColumnParallelLinear"
    assert te.te_class_in_mro([("my_model.layers", "MyQKV"), *column], known) == (
        "TEColumnParallelLinear"
    )
    assert te.te_class_in_mro([("my_model.layers", "TERowParallelLinear")], known) is None
    assert te.te_class_in_mro(_mro("TENorm"), known) is None
    assert te.te_class_in_mro(_mro("TEFusedMLP"), {te.FUSED_TE_MLP}) == "TEFusedMLP"


def test_the_norm_fused_layer_is_the_only_supported_layernorm_linear():
    wrappers = _te_linear_wrappers()
    fused = {n for n in te.SUPPORTED_TE_LAYERS if wrappers[n] == "te.pytorch.LayerNormLinear"}
    assert fused == {te.NORM_FUSED_TE_LAYER}


def test_a_target_inside_te_fused_mlp_is_refused_at_injection():
    from tests.test_adapter_layers import _Layer, _Model
    from tests.test_te_layers import _config
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    config = _config()
    base = _local_column(config)
    model = _Model(config, [_Layer(1, "linear_fc1", base)])
    cfg = TiedLoRAConfig.preset("vBuA", rank=4, target_modules=["linear_fc1"])
    with (
        mock.patch("tiedlora_megatron.inject.is_fused_te_mlp", lambda m: isinstance(m, _Layer)),
        pytest.raises(UnsupportedLayerError, match="TEFusedMLP .*use_te_op_fuser=False"),
    ):
        apply_tied_lora(model, cfg)
    assert all(p.requires_grad for p in model.parameters()), "refused before freezing"


def _local_column(config):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return ColumnParallelLinear(
        16, 24, config=config, init_method=torch.nn.init.zeros_, bias=True, skip_bias_add=True
    )


# -- layout choice ------------------------------------------------------------------------------


def test_supported_layouts_follow_megatron_parallel_mode():
    for name, parallel in te.SUPPORTED_TE_LAYERS.items():
        assert _super_init_parallel_mode(name) == parallel, name


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(te.SUPPORTED_TE_LAYERS))
def test_layout_from_te_attributes(name, tp):
    # A 16 -> 48 layer as TE stores it: a column layer keeps 48/tp output rows, a row layer
    # 16/tp input columns; the other size is global.
    column = te.SUPPORTED_TE_LAYERS[name] == "column"
    parallel, fields = te_layout_fields(
        name,
        "decoder.layers.0.self_attention.linear_qkv",
        parallel_mode="column" if column else "row",
        in_features=16 if column else 16 // tp,
        out_features=48 // tp if column else 48,
        tp_size=tp,
    )
    assert parallel == ("column" if column else "row")
    assert fields == dict(
        in_features=16,
        out_features=48,
        tp_size=tp,
        normalizes_input=name == "TELayerNormColumnParallelLinear",
    )


@pytest.mark.parametrize(
    "name,path,kw,match",
    [
        ("TEColumnParallelLinear", "m.linear_fc1", {"parallel_mode": None}, "parallel_mode=None"),
        ("TERowParallelLinear", "m.linear_fc2", {"parallel_mode": "column"}, "expected 'row'"),
        ("TERowParallelLinear", "mlp.experts.linear_fc2", {}, "expert \\(MoE\\)"),
        ("TELinear", "m.linear_proj", {}, "not a tensor-parallel column or row layer"),
        ("TEGroupedLinear", "m.linear_fc1", {}, "grouped \\(MoE expert\\)"),
        ("TENorm", "m.input_layernorm", {}, "not a TE linear wrapper"),
        (
            "TELayerNormColumnParallelLinear",
            "m.linear_qkv",
            {"returns_norm_output": True},
            "already returns its norm's output",
        ),
    ],
)
def test_layouts_the_adapter_cannot_follow_are_refused(name, path, kw, match):
    attrs = dict(parallel_mode=te.SUPPORTED_TE_LAYERS.get(name, "column"), tp_size=1)
    attrs.update(in_features=16, out_features=16, **kw)
    with pytest.raises(UnsupportedLayerError, match=f"^{path}: {name}.*{match}"):
        te_layout_fields(name, path, **attrs)


# -- return-value normalisation -----------------------------------------------------------------


def _te_module_return(out, bias, ln, return_bias: bool, return_ln: bool):
    """What TE's `Linear` / `LayerNormLinear.forward` return (TE 2.x, both modules): the output,
    then the bias when `return_bias`, then the norm's output when `return_layernorm_output`;
    a bare tensor when neither."""
    extra = (*((bias,) if return_bias else ()), *((ln,) if return_ln else ()))
    return (out, *extra) if extra else out


def _megatron_wrapper_return(te_out, te_return_bias: bool):
    """megatron-core's wrappers' `forward`: TE's value when TE returned its bias, else
    (TE's value, None); see test_megatron_wrappers_return_forms."""
    return te_out if te_return_bias else (te_out, None)


def test_megatron_wrappers_return_forms():
    """The wrapper half of the forms above, read off megatron-core's `forward`s."""
    classes = _megatron_te_classes()
    for name in ("TELinear", "TELayerNormColumnParallelLinear"):
        forward = next(
            n for n in classes[name].body if isinstance(n, ast.FunctionDef) and n.name == "forward"
        )
        returns = [ast.unparse(n.value) for n in ast.walk(forward) if isinstance(n, ast.Return)]
        branch = next(n for n in ast.walk(forward) if isinstance(n, ast.If))
        assert ast.unparse(branch.test) == "self.te_return_bias", name
        assert [ast.unparse(n) for n in branch.body] == ["return out"], name
        assert sorted(returns) == ["(out, None)", "out"], (name, returns)
    # Both supported column/row wrappers besides the norm-fused one inherit TELinear's forward.
    for name in ("TEColumnParallelLinear", "TERowParallelLinear"):
        assert not any(
            isinstance(n, ast.FunctionDef) and n.name == "forward" for n in classes[name].body
        )


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("return_bias", [True, False])
@pytest.mark.parametrize("norm_fused", [True, False])
def test_split_output_handles_every_te_return_form(norm_fused, return_bias, has_bias):
    out, bias, ln = torch.randn(3, 2, 4), torch.randn(4), torch.randn(3, 2, 4)
    # megatron asks TE to return the bias only when there is one (te_return_bias).
    te_return_bias = return_bias and has_bias
    for returns_ln in (True, False) if norm_fused else (False,):
        value = _megatron_wrapper_return(
            _te_module_return(out, bias, ln, te_return_bias, returns_ln), te_return_bias
        )
        got = split_output(value, "m.linear_qkv", normalizes_input=returns_ln)
        want = (out, bias if te_return_bias else None, ln if returns_ln else None)
        assert all(g is w for g, w in zip(got, want, strict=True)), (value, got)


@pytest.mark.parametrize(
    "value,normalizes_input,match",
    [
        (torch.zeros(2), False, "expected the layer to return \\(output, bias\\), got Tensor"),
        ((torch.zeros(2),), False, "got tuple of length 1"),
        ((torch.zeros(2), None), True, "\\(\\(output, norm_output\\), None\\) or"),
        (((torch.zeros(2), None), None), True, "got tuple of length 2"),
        ([torch.zeros(2), None], False, "got list"),
    ],
)
def test_split_output_refuses_other_forms(value, normalizes_input, match):
    with pytest.raises(UnsupportedLayerError, match=f"^m.linear_qkv: .*{match}"):
        split_output(value, "m.linear_qkv", normalizes_input)


@pytest.mark.skipif(te.te_version() is not None, reason="TE is installed")
def test_te_block_spec_without_te_says_so():
    from megatron.core.transformer import TransformerConfig

    from tiedlora_megatron.spec import te_gpt_block_spec

    config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2)
    with pytest.raises(te.TransformerEngineUnavailableError, match="not installed"):
        te_gpt_block_spec(config)


def test_megatron_enters_fp8_per_forward_from_config():
    """The job turns FP8 off for generation by clearing `config.fp8` (finetune.job.fp8_disabled);
    that works because megatron-core's TransformerBlock reads it in every forward."""
    tree = _megatron_source("transformer/transformer_block.py")
    block = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "TransformerBlock"
    )
    forward = next(n for n in block.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    reads = [ast.unparse(n) for n in ast.walk(forward) if isinstance(n, ast.Attribute)]
    assert "self.config.fp8" in reads
