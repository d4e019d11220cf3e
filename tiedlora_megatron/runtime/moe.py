"""megatron-core's mixture-of-experts layers on CPU with gloo: three redirects that
`enable_cpu_runtime` applies (and only it: where CUDA is present nothing here runs).

- Without Transformer Engine, megatron-core 0.16's `moe_utils` never binds `te_general_gemm`,
  which the router's gating tests against None: bound to None (0.19 does so itself).
- The all-to-all dispatcher turns its split sizes into numpy arrays only for CUDA tensors
  (`maybe_move_tensor_to_cpu`); gloo's `all_to_all_single` rejects tensor split sizes. CPU
  tensors are converted too (the dispatcher imports the name, so it is rebound there as well).
- With TP > 1 and sequence parallelism, that dispatcher gathers tokens of unequal counts across
  the TP group (`_gather_along_first_dim` with `output_split_sizes`), which gloo's `all_gather`
  refuses: on gloo groups every rank's chunk is padded to the largest, gathered, then trimmed.

The all-gather dispatcher needs only the first. Grouped-GEMM experts need `grouped_gemm` or TE
and do not run here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"
_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"
_MAPPINGS = "megatron.core.tensor_parallel.mappings"


def enable_moe_on_gloo() -> None:
    """Apply the three redirects; idempotent."""
    moe_utils = importlib.import_module(_MOE_UTILS)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _rebind(moe_utils, "maybe_move_tensor_to_cpu", _numpy_splits_on_cpu, also_in=_DISPATCHER)
    _rebind(importlib.import_module(_MAPPINGS), "_gather_along_first_dim", _padded_uneven_gather)


def _rebind(
    module: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]], also_in=None
) -> None:
    original = getattr(module, name)
    if getattr(original, "_tiedlora_cpu", False):
        return
    redirect = make(original)
    redirect._tiedlora_cpu = True
    setattr(module, name, redirect)
    if also_in is not None:
        user = importlib.import_module(also_in)
        if getattr(user, name, None) is original:
            setattr(user, name, redirect)


def _numpy_splits_on_cpu(original: Callable[..., Any]) -> Callable[..., Any]:
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


def _padded_uneven_gather(original: Callable[..., Any]) -> Callable[..., Any]:
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded, group=group)
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes, strict=True)])

    return _gather_along_first_dim
