"""Where tiedlora_megatron runs: CPU support for megatron-core (a no-op where CUDA is present),
with megatron's known CPU-host notices hidden ($TIEDLORA_VERBOSE=1 shows them), and the free
local port a single-process job rendezvouses on."""

import socket

from tiedlora_megatron.runtime.cpu import cpu_runtime_enabled, enable_cpu_runtime, quiet_megatron


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["cpu_runtime_enabled", "enable_cpu_runtime", "free_port", "quiet_megatron"]
