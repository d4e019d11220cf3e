"""Tied-LoRA adapters (and LoRA, VeRA) for megatron-core models.

from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora, count_trainable_parameters
cfg = TiedLoRAConfig.preset("vBuA", rank=8, alpha=16, target_modules=["linear_qkv"])
adapters = apply_tied_lora(model, cfg)
"""

from typing import Any

from tiedlora_megatron.config import PRESETS, SUPPORTED_TARGETS, ConfigError, TiedLoRAConfig
from tiedlora_megatron.params import ModelDims, count_trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SUPPORTED_TARGETS",
    "ConfigError",
    "ModelDims",
    "TiedLoRAAdapters",
    "TiedLoRAConfig",
    "apply_tied_lora",
    "count_trainable_parameters",
    "finalize_model_grads",
]


def __getattr__(name: str) -> Any:
    # The adapter code imports megatron-core (seconds); config and accounting do not need it.
    if name in ("apply_tied_lora", "TiedLoRAAdapters"):
        from tiedlora_megatron import inject

        return getattr(inject, name)
    if name == "finalize_model_grads":
        from tiedlora_megatron.pipeline import finalize_model_grads

        return finalize_model_grads
    raise AttributeError(f"module 'tiedlora_megatron' has no attribute {name!r}")
