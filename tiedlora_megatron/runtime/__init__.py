"""Where tiedlora_megatron runs: CPU support for megatron-core (a no-op where CUDA is present)."""

from tiedlora_megatron.runtime.cpu import cpu_runtime_enabled, enable_cpu_runtime

__all__ = ["cpu_runtime_enabled", "enable_cpu_runtime"]
