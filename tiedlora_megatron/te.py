"""Transformer Engine: recognising megatron-core's TE layers, and the TE versions supported.

Nothing here imports `transformer_engine` at module level: the package and its CPU tests run
without TE. megatron-core's TE wrappers are recognised by their class's qualified name, so
telling them apart needs no TE import either; only adapting one asks for TE (`require_te`).

What the adapter relies on from TE, read from TE's 1.x and 2.x sources (`LayerNormLinear`,
`Linear`) and megatron-core 0.16's and 0.19's wrappers
(`megatron/core/extensions/transformer_engine.py`):
- the module attributes `parallel_mode`, `tp_size`, `tp_group`, `sequence_parallel`,
  `in_features` (local for a row layer) and `out_features` (local for a column layer);
- `LayerNormLinear.return_layernorm_output`, read at every forward: when set, TE returns the
  normalised input in the activation dtype (never FP8: TE casts its own GEMM input separately),
  and adds that output's gradient to the layer's input gradient after its own tensor-parallel
  reduction, so the normalised input behaves like any other activation;
- the return forms, documented with `layouts.split_output`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Literal

from packaging.version import Version
from torch import nn

#: Oldest Transformer Engine release the adapter accepts. The contract above reads the same in
#: TE 1.x, but megatron-core 0.16 targets TE 2.x (its own dev pin is 2.9 - 2.11) and the GPU
#: check (tests/gpu/check_te.py) is for TE 2: older releases are refused rather than assumed.
MIN_TE_VERSION = Version("2.0")

#: The module megatron-core's TE wrappers live in.
TE_WRAPPER_MODULE = "megatron.core.extensions.transformer_engine"

#: megatron-core's TE linear layers the adapter follows, and their tensor-parallel layout.
SUPPORTED_TE_LAYERS: dict[str, Literal["column", "row"]] = {
    "TELayerNormColumnParallelLinear": "column",
    "TEColumnParallelLinear": "column",
    "TERowParallelLinear": "row",
}

#: The TE linear layer that fuses the input norm: the adapter's input is its normalised input.
NORM_FUSED_TE_LAYER = "TELayerNormColumnParallelLinear"

#: megatron-core's MLP that runs its layers as fused TE ops (`use_te_op_fuser=True`): it reads the
#: layers' weights but never calls their forward, so an adapter on them would never run.
FUSED_TE_MLP = "TEFusedMLP"

#: megatron-core's TE linear layers the adapter refuses, and why.
UNSUPPORTED_TE_LAYERS: dict[str, Literal["column", "row"]] = {
    "TELinear": "a plain TELinear (parallel_mode='duplicated' or None) is not a tensor-parallel "
    "column or row layer",
    "TEGroupedLinear": "grouped (MoE expert) layers are not supported",
    "TEColumnParallelGroupedLinear": "grouped (MoE expert) layers are not supported",
    "TERowParallelGroupedLinear": "grouped (MoE expert) layers are not supported",
    # megatron-core >= 0.19: GPTModel's output layer under MXFP8 (`fp8_output_proj`); it gathers
    # its own output and is never one of the transformer layers' adapter targets.
    "TELMHeadColumnParallelLinear": "the MXFP8 LM head (output_layer) is not an adapter target",
}


class TransformerEngineUnavailableError(ImportError):
    """Transformer Engine is needed but not installed, or older than MIN_TE_VERSION."""


def te_version() -> Version | None:
    """The installed Transformer Engine version, or None when TE cannot be imported."""
    from tiedlora_megatron.compat import installed_te_version

    return installed_te_version()


def require_te() -> Version:
    """The installed TE version; raises TransformerEngineUnavailableError, saying what to do,
    when TE is missing or older than MIN_TE_VERSION."""
    version = te_version()
    if version is None:
        raise TransformerEngineUnavailableError(
            "Transformer Engine is not installed (import transformer_engine failed): install "
            f"transformer-engine[pytorch]>={MIN_TE_VERSION} on a CUDA machine, or build the "
            "model with megatron-core's local spec (tiedlora_megatron.spec)"
        )
    if version < MIN_TE_VERSION:
        raise TransformerEngineUnavailableError(
            f"Transformer Engine {version} is not supported: tiedlora_megatron adapts TE layers "
            f"with TE >= {MIN_TE_VERSION}"
        )
    return version


def te_layer_name(module: nn.Module) -> str | None:
    """The megatron-core TE linear wrapper `module` is (or subclasses); None for any other
    module."""
    return te_class_in_mro(_mro_names(module), SUPPORTED_TE_LAYERS.keys() | UNSUPPORTED_TE_LAYERS)


def is_fused_te_mlp(module: nn.Module) -> bool:
    """Whether `module` is (or subclasses) megatron-core's TEFusedMLP."""
    return te_class_in_mro(_mro_names(module), {FUSED_TE_MLP}) is not None


def te_class_in_mro(mro: Iterable[tuple[str, str]], names: Collection[str]) -> str | None:
    """The first of megatron-core's TE classes `names` in `mro`, a class's (module, qualified
    name) pairs, most derived first; None when there is none.

    By name, so that recognising a TE class never imports TE: a class counts only where
    megatron-core's TE module defines it, never a same-named class elsewhere."""
    for module_name, qualname in mro:
        if module_name == TE_WRAPPER_MODULE and qualname in names:
            return qualname
    return None


def _mro_names(module: nn.Module) -> list[tuple[str, str]]:
    return [(cls.__module__, cls.__qualname__) for cls in type(module).__mro__]
