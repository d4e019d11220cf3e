"""Tied-LoRA in a Megatron-Bridge fine-tuning recipe.

    torchrun --nproc-per-node 8 examples/bridge/finetune_recipe.py \
        --pretrained-checkpoint /checkpoints/llama32_1b [--preset vBuA --dim 8 --alpha 16]

Builds a Megatron-Bridge PEFT recipe (`--recipe`, default Llama 3.2 1B on SQuAD) and replaces
its LoRA with Tied-LoRA: `cfg.peft = TiedLoRA(...)`. Everything else is the recipe's; Bridge
applies the PEFT to the model chunks before wrapping them, saves adapter-only checkpoints through
`TiedLoRA.adapter_key_filter`, and the tied factors' gradients are summed across pipeline stages
and virtual chunks whatever finalize function it sets. Needs Megatron-Bridge and its GPU stack
(`pip install megatron-bridge`); recipe names change between Bridge releases (`--recipe`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Any


def tied_lora_peft(preset: str = "vBuA", dim: int = 8, alpha: float = 16) -> Any:
    """The recipe's PEFT (the same as examples/bridge/tiedlora_peft.yaml)."""
    from tiedlora_megatron.integrations.bridge import TiedLoRA

    return TiedLoRA(preset=preset, dim=dim, alpha=alpha, target_modules=["linear_qkv"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipe",
        default="megatron.bridge.recipes.llama.llama32_1b_peft_config",
        help="module.function returning a Megatron-Bridge ConfigContainer",
    )
    parser.add_argument("--pretrained-checkpoint", help="the frozen base model (megatron format)")
    parser.add_argument("--preset", default="vBuA")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    args = parser.parse_args()

    if importlib.util.find_spec("megatron.bridge") is None:
        sys.exit(
            "this example runs a Megatron-Bridge recipe, and megatron.bridge is not installed: "
            "pip install megatron-bridge (with its GPU stack). Without it, use "
            "tiedlora_megatron.integrations.bridge.TiedLoRA as a standalone PEFT, or "
            "examples/finetune_tiny_gpt.py for plain megatron-core."
        )
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.gpt_step import forward_step

    module, _, name = args.recipe.rpartition(".")
    cfg = getattr(importlib.import_module(module), name)()
    cfg.peft = tied_lora_peft(args.preset, args.dim, args.alpha)
    if args.pretrained_checkpoint:
        cfg.checkpoint.pretrained_checkpoint = args.pretrained_checkpoint
    finetune(config=cfg, forward_step_func=forward_step)


if __name__ == "__main__":
    main()
