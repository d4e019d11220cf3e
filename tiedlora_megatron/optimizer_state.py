"""Torch-Adam state around megatron-core's checkpoint load: the state it expects to find (before
the load) and the step it leaves shared (after it)."""

from __future__ import annotations

from typing import Any

import torch


def materialise_adam_state(optimizer) -> None:
    """Give a never-stepped torch Adam the state entries it creates lazily on its first step.

    Without apex / TE, megatron's DistributedOptimizer falls back to torch Adam and reads each
    state's "step" when building its state dict, so loading into a fresh optimizer would fail.
    The entries are overwritten by the loaded state."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if state:
                    continue
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )


def restore_adam_steps(optimizer, loaded: dict[str, Any]) -> None:
    """Give each torch-Adam parameter state its own step tensor with the saved step.

    Without apex / TE, megatron's DistributedOptimizer keeps the step in its param groups and,
    on load, leaves torch Adam's per-parameter steps at their pre-load value, sharing one
    tensor among all parameters (torch Adam increments each in place, so a shared one would
    advance once per parameter per step)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    if "optimizer" in loaded:
        states = [loaded]
    elif all(str(k).isdigit() for k in loaded):  # a chain of several optimizers
        states = [loaded[k] for k in sorted(loaded, key=int)]
    else:
        return
    for inner, inner_state in zip(inners, states, strict=False):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(inner, DistributedOptimizer) or not isinstance(
            torch_opt, torch.optim.Adam | torch.optim.AdamW
        ):
            continue
        groups = inner_state.get("optimizer", {}).get("param_groups", [])
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in torch_opt.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(step, dtype=torch.float32)
