"""Tied-LoRA as a Megatron-Bridge / NeMo 2 PEFT: `cfg.peft = TiedLoRA(preset="vBuA", dim=8)`.

Megatron-Bridge's PEFT protocol (`megatron.bridge.peft.base.PEFT`, NeMo 2's is the same) is a
dataclass that the trainer calls on the model chunks before wrapping them in Float16Module and
DDP (`peft(chunks, training=True)`, then `peft.set_params_to_save(chunks)`), and whose
`adapter_key_filter(key)` picks the checkpoint keys that an adapter checkpoint keeps. `TiedLoRA`
implements it on top of `apply_tied_lora`, so it adds exactly the adapters the plain API adds:

- `__call__` adapts the whole model at once rather than module by module. The tied A and B of a
  target kind are shared by every layer of every virtual-pipeline chunk, so they must exist,
  with one owner per chunk, before any layer's adapter does. A per-module `transform` would also
  have to register each adapter beside its base layer while Bridge's walk iterates over that
  parent's children, and the walk rebuilds every `ModuleDict` it visits (the factor bank is one).
- `transform(module, name, prefix)` is therefore a lookup, not a constructor. Adapters run as
  forward hooks of their base layer, which keeps the base's parameter names and checkpoint keys,
  so an adapted layer is returned as it is; a target layer the call did not adapt is an error
  instead of a silently unadapted layer.
- `adapter_key_filter` selects by name (`<layer>_adapter.*`, `tied_adapter.*`) under any wrapper
  prefix, in state dicts and sharded state dicts alike, frozen factors (VeRA's A, B) included.
- Trainers (Megatron-Bridge, Megatron-LM) set `config.finalize_model_grads_func` to
  megatron-core's own after the model is built. That needs nothing from this class: the sum of
  the tied factors' gradients over their replicas (pipeline stages, virtual chunks) is fired by
  megatron DDP's `finish_grad_sync`, which every finalize function calls (`pipeline.py`).

Megatron-Bridge is optional: when it is installed `TiedLoRA` subclasses its `PEFT` (so
`ConfigContainer` and Bridge's YAML tooling accept it), otherwise a local stand-in with the same
field and abstract method. YAML: `_target_: tiedlora_megatron.integrations.bridge.TiedLoRA` with
the fields below as keys (`examples/bridge/tiedlora_peft.yaml`).

NeMo 2 (`nemo.collections.llm.finetune(..., peft=...)`) takes a
`nemo.lightning.pytorch.callbacks.peft.PEFT`, a Lightning callback that applies the transform
and handles adapter checkpoint IO. Mix that callback in, with `TiedLoRA` first so its `__call__`
(the whole-model application), `transform` and `adapter_key_filter` win; NeMo passes its
`MegatronParallel` list of chunks, each wrapping the megatron model under `.module`, which
`__call__` unwraps (not exercised here: NeMo is not a dependency):

    @dataclass
    class NeMoTiedLoRA(TiedLoRA, nemo.lightning.pytorch.callbacks.peft.PEFT):
        pass
"""

from __future__ import annotations

import dataclasses
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from tiedlora_megatron.config import SUPPORTED_TARGETS, ConfigError, TiedLoRAConfig
from tiedlora_megatron.experts import target_kind
from tiedlora_megatron.inject import TiedLoRAAdapters, apply_tied_lora, is_adapter_param

ModelT = TypeVar("ModelT", nn.Module, list[nn.Module])


@dataclass
class _LocalPEFT(ABC):
    """Stand-in for `megatron.bridge.peft.base.PEFT` where Megatron-Bridge is not installed: its
    runtime field and abstract method, so `TiedLoRA` has one definition either way."""

    params_to_save: set[str] = field(default_factory=set, init=False, repr=False)

    @abstractmethod
    def transform(
        self, module: nn.Module, name: str | None = None, prefix: str | None = None
    ) -> nn.Module: ...


def _peft_base() -> type:
    # An installed Bridge that fails to import raises its own error here: the stand-in would
    # hide it until Bridge's ConfigContainer refused a TiedLoRA that is not its PEFT.
    if importlib.util.find_spec("megatron.bridge") is None:
        return _LocalPEFT
    from megatron.bridge.peft.base import PEFT

    return PEFT


_PEFTBase = _peft_base()

#: The TiedLoRAConfig fields that `TiedLoRA` passes on (all of them: a test keeps them in step).
_CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TiedLoRAConfig))


@dataclass
class _Applied:
    """What a call added to which model (runtime state, never serialised with the config)."""

    adapters: TiedLoRAAdapters
    training: bool
    adapted: frozenset[int]
    """`id` of every base layer that got an adapter."""


@dataclass
class TiedLoRA(_PEFTBase):
    """Tied-LoRA (and LoRA, VeRA) adapters for a Megatron-Bridge or NeMo 2 fine-tune.

    Every field left None takes the preset's value, else TiedLoRAConfig's default (rank 8, alpha
    = rank, adapters on `linear_qkv`); see TiedLoRAConfig for their meaning. The fields are
    validated on construction and again on every call (recipes change them after construction),
    each error naming the field at fault.
    """

    preset: str | None = "vBuA"
    """A name of `tiedlora_megatron.PRESETS` ("lora", "vera", "vBuA", ...) or a factor notation
    ("vB~uA"); None builds the config from the fields alone."""

    dim: int | None = None
    """The rank r under Megatron-Bridge's name for it (`LoRA(dim=...)`); same as `rank`."""

    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] | None = None
    factors: str | None = None
    tied: bool | None = None
    tie_experts: bool | None = None
    a_init: str | None = None
    b_init: str | None = None
    u_init: float | None = None
    v_init: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self._applied: _Applied | None = None
        self.to_config()

    def __getstate__(self) -> dict[str, Any]:
        # A copied or pickled config (trainers deep-copy theirs) must not drag the model along.
        return {**self.__dict__, "_applied": None}

    def to_config(self) -> TiedLoRAConfig:
        """The TiedLoRAConfig these fields describe."""
        if self.dim is not None and self.rank is not None and self.dim != self.rank:
            raise ConfigError(
                f"dim={self.dim!r} and rank={self.rank!r} disagree: both name the rank "
                "(dim is Megatron-Bridge's name for it); set one of them"
            )
        values = {f: getattr(self, f) for f in _CONFIG_FIELDS if getattr(self, f) is not None}
        if self.dim is not None:
            values["rank"] = self.dim
        if self.preset is None:
            return TiedLoRAConfig.from_dict(values)
        return TiedLoRAConfig.preset(self.preset, **values)

    @property
    def adapters(self) -> TiedLoRAAdapters:
        """What the last call added: for `tiedlora_megatron.checkpoint`, counts, `detach()`."""
        if self._applied is None:
            raise RuntimeError("this TiedLoRA has not been applied to a model yet: call it first")
        return self._applied.adapters

    # -- the PEFT protocol -----------------------------------------------------------------

    def __call__(self, model: ModelT, training: bool = True) -> ModelT:
        """Freeze `model` (a megatron-core model or a list of virtual-pipeline chunks, possibly
        under Float16Module) and add the adapters to all of its chunks; returns `model`.

        `training=False` freezes the adapters too. Calling again with the same model and
        arguments returns it unchanged; anything else on an adapted model is refused.
        """
        config = self.to_config()
        given = _chunks(model)
        chunks = [_unwrapped(c) for c in given]
        applied = self._applied
        if applied is not None and _same_modules(applied.adapters.chunks, chunks):
            if applied.adapters.config != config or applied.training != training:
                raise RuntimeError(
                    f"this model already has the adapters of this TiedLoRA ({applied.adapters}, "
                    f"training={applied.training}); a second call may only repeat the first, "
                    "which returns the model unchanged: build a fresh model to apply other settings"
                )
            return model
        adapters = apply_tied_lora(chunks, config)
        if not training:
            self.freeze_model(given, training=False)
        for chunk in given:
            chunk.train(training)
        adapted = frozenset(
            id(chunk.get_submodule(name))
            for chunk, named in zip(chunks, adapters.adapters, strict=True)
            for name in named
        )
        self._applied = _Applied(adapters, training, adapted)
        return model

    def transform(
        self, module: nn.Module, name: str | None = None, prefix: str | None = None
    ) -> nn.Module:
        """`module` itself: `__call__` has added the adapters of the whole model (see the module
        docstring), and an adapted layer is its own wrapper. Raises for a target layer of this
        config that `__call__` did not adapt, e.g. when a walker calls `transform` alone."""
        applied = self._applied
        path = f"{prefix}.{name}" if prefix else (name or "")
        kind = target_kind(path)
        if kind not in SUPPORTED_TARGETS or (applied is not None and id(module) in applied.adapted):
            return module
        if kind in self.to_config().target_modules and isinstance(
            module, (ColumnParallelLinear, RowParallelLinear)
        ):
            raise RuntimeError(
                f"{path}: TiedLoRA adds its adapters to the whole model at once in __call__ (the "
                "tied factors are shared by every layer of every pipeline chunk) and has not "
                "adapted this layer: apply the instance to the model, `peft(model_chunks)`, "
                "rather than its transform to single modules"
            )
        return module

    def freeze_model(self, model: ModelT, training: bool = True) -> None:
        """Freeze every parameter, adapters included (`training=False`); with `training`, put
        the chunks in training mode, as Megatron-Bridge's `freeze_model` does."""
        for chunk in _chunks(model):
            for p in chunk.parameters():
                p.requires_grad_(False)
            if training:
                chunk.train(True)

    def set_params_to_save(self, model: ModelT) -> None:
        """Names of every adapter parameter, trained or frozen (a frozen random A or B is part
        of the adapter too), and of any other parameter left trainable."""
        self.params_to_save = {
            name
            for chunk in _chunks(model)
            for name, p in chunk.named_parameters()
            if p.requires_grad or is_adapter_param(name)
        }

    def adapter_key_filter(self, key: str | tuple[str, Any]) -> bool:
        """True for the keys of adapter tensors, in a (sharded) state dict or as a
        `(name, parameter)` pair, and for the names `set_params_to_save` recorded."""
        name = key[0] if isinstance(key, tuple) else key
        return is_adapter_param(name) or name in self.params_to_save

    def disable_adapter_layers(self, model: ModelT) -> None:
        """Stop the adapters of `model` from adding their update (Bridge's `disable_adapter`
        context calls this: the base model's outputs, for a reference policy or a baseline)."""
        self._adapters_of(model).detach()

    def enable_adapter_layers(self, model: ModelT) -> None:
        """Undo `disable_adapter_layers`."""
        adapters = self._adapters_of(model)
        for chunk, named in zip(adapters.chunks, adapters.adapters, strict=True):
            for name, adapter in named.items():
                adapter.detach()
                adapter.attach(chunk.get_submodule(name))

    def _adapters_of(self, model: ModelT) -> TiedLoRAAdapters:
        adapters = self.adapters
        if not _same_modules(adapters.chunks, [_unwrapped(c) for c in _chunks(model)]):
            raise RuntimeError("this TiedLoRA was last applied to another model")
        return adapters


def _chunks(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """The model chunks: a list or tuple of them, or a ModuleList (NeMo's MegatronParallel)."""
    return list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]


def _unwrapped(chunk: nn.Module) -> nn.Module:
    """The megatron model under Float16Module (or NeMo's LightningModule) wrappers, whose state
    dicts delegate to it: the factor bank must live there. DDP is returned as it is, for
    `apply_tied_lora` to refuse it with its reason."""
    from megatron.core.distributed import DistributedDataParallel

    ddp = (DistributedDataParallel, nn.parallel.DistributedDataParallel)
    while not isinstance(chunk, ddp) and isinstance(getattr(chunk, "module", None), nn.Module):
        chunk = chunk.module
    return chunk


def _same_modules(a: list[nn.Module], b: list[nn.Module]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
