"""`tiedlora-megatron`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tiedlora_megatron.config import PRESETS, SUPPORTED_TARGETS, ConfigError
from tiedlora_megatron.params import ModelDims, preset_table

#: Dimensions of well-known models, for `params --model`.
KNOWN_DIMS: dict[str, ModelDims] = {
    "llama2-7b": ModelDims(4096, 32, 11008, 32, 32, gated_linear_unit=True),
    "llama2-13b": ModelDims(5120, 40, 13824, 40, 40, gated_linear_unit=True),
    "llama3-8b": ModelDims(4096, 32, 14336, 32, 8, gated_linear_unit=True),
    "smollm2-135m": ModelDims(576, 30, 1536, 9, 3, gated_linear_unit=True),
    "gpt2": ModelDims(768, 12, 3072, 12, 12),
    "mixtral-8x7b": ModelDims(
        4096, 32, 14336, 32, 8, gated_linear_unit=True, num_moe_experts=8, moe_ffn_hidden_size=14336
    ),
    "qwen1.5-moe-a2.7b": ModelDims(
        2048,
        24,
        5632,
        16,
        16,
        gated_linear_unit=True,
        num_moe_experts=60,
        moe_ffn_hidden_size=1408,
        moe_shared_expert_intermediate_size=5632,
    ),  # fmt: skip
}


def _params(args: argparse.Namespace) -> int:
    if args.model:
        dims = KNOWN_DIMS[args.model]
    else:
        missing = [f for f in ("hidden_size", "num_layers") if getattr(args, f) is None]
        if missing:
            print(
                "error: give --model or at least --hidden-size and --num-layers",
                file=sys.stderr,
            )
            return 2
        dims = ModelDims(
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            ffn_hidden_size=args.ffn_hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups,
            gated_linear_unit=args.gated,
            num_moe_experts=args.num_moe_experts,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        )
    try:
        rows = preset_table(dims, args.rank, args.targets, args.presets)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"Trainable parameters, rank {args.rank}, targets {', '.join(args.targets)}; "
        f"hidden {dims.hidden_size}, {dims.num_layers} layers"
    )
    moe = dims.num_moe_experts is not None
    if moe:
        print(
            f"MoE: {dims.num_moe_experts} routed experts per layer"
            + (
                f", shared expert {dims.moe_shared_expert_intermediate_size}"
                if dims.moe_shared_expert_intermediate_size
                else ""
            )
            + "; 'experts' is how routed experts share A and B (all, per expert, own)"
        )
    experts = f" {'experts':<10}" if moe else ""
    header = f"{'preset':<10} {'factors':<9} {'tied':<5}{experts} {'trainable':>14} {'vs LoRA':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['preset']:<10} {r['factors']:<9} {'yes' if r['tied'] else 'no':<5}"
            + (f" {r['experts']:<10}" if moe else "")
            + f" {r['trainable']:>14,} {100 * r['vs_lora']:>8.2f}%"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    """Single-process (TP = PP = 1): load the base and the adapter checkpoint, then export.

    Refuses, before loading any weights, a --base that names no usable model (`resolve_base`),
    an --out that is, lies in or contains the base or --adapter, an --overwrite of anything but
    an earlier export, and an adapter checkpoint that fails verification
    (`verify_adapter_checkpoint`) or was trained on a model of other dims; the checkpoint is
    checked against the model again as it loads."""
    from pathlib import Path

    from tiedlora_megatron.runtime import quiet_megatron

    quiet_megatron()  # CPU hosts only; before megatron is imported, which warns at import
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.checkpoint import (
        load_adapter_checkpoint,
        verify_adapter_checkpoint,
    )
    from tiedlora_megatron.export import export_merged_hf, export_peft
    from tiedlora_megatron.export_base import check_adapter_base, resolve_base
    from tiedlora_megatron.export_write import check_destination
    from tiedlora_megatron.runtime import enable_cpu_runtime, free_port

    try:
        base = resolve_base(args.base, args.hf_config)
        protected = {**base.protected(), "adapter checkpoint": Path(args.adapter)}
        check_destination(Path(args.out), args.overwrite, protected)
        meta = verify_adapter_checkpoint(args.adapter)
        check_adapter_base(meta, base, args.adapter)
    except Exception as e:  # noqa: BLE001 - known failures get one line, bugs a traceback
        return _report(e)
    enable_cpu_runtime()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        ps.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1234)
        config = TiedLoRAConfig.from_dict(meta["adapter_config"])
        chunks, _ = base.load()
        adapters = apply_tied_lora(chunks, config)
        load_adapter_checkpoint(args.adapter, chunks, adapters)
        export = export_peft if args.format == "peft" else export_merged_hf
        out = export(
            adapters,
            chunks,
            base,
            args.out,
            overwrite=args.overwrite,
            adapter_checkpoint=args.adapter,
        )
    except Exception as e:  # noqa: BLE001 - known failures get one line, bugs a traceback
        return _report(e)
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiedlora-megatron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="trainable parameters of every preset against LoRA")
    p.add_argument("--model", choices=sorted(KNOWN_DIMS), help="take the dims of a known model")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--ffn-hidden-size", type=int)
    p.add_argument("--num-attention-heads", type=int, default=1)
    p.add_argument("--num-query-groups", type=int)
    p.add_argument("--gated", action="store_true", help="SwiGLU fc1 (2 x ffn outputs)")
    p.add_argument("--num-moe-experts", type=int, help="routed experts per layer (MoE model)")
    p.add_argument("--moe-ffn-hidden-size", type=int, help="a routed expert's hidden size")
    p.add_argument(
        "--moe-shared-expert-intermediate-size", type=int, help="the shared expert's hidden size"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["linear_qkv"], choices=SUPPORTED_TARGETS)
    p.add_argument("--presets", nargs="+", choices=list(PRESETS), help="default: all")
    p.set_defaults(func=_params)
    e = sub.add_parser("export", help="export an adapter checkpoint as HF PEFT LoRA or merged HF")
    e.add_argument(
        "--base",
        required=True,
        help="the base model the adapter was trained on, as the job's model.source names it: "
        "'smollm2' (the packaged SmolLM2-135M-Instruct GGUF), a GGUF file, an HF model directory "
        "or a megatron checkpoint (with --hf-config)",
    )
    e.add_argument(
        "--hf-config",
        help="for a megatron checkpoint --base only: the HF model directory or GGUF file (or "
        "'smollm2') that names its HF architecture and tokenizer, as model.tokenizer did for "
        "the job",
    )
    e.add_argument("--adapter", required=True, help="a Tied-LoRA adapter checkpoint directory")
    e.add_argument("--format", choices=["peft", "merged-hf"], required=True)
    e.add_argument(
        "--out",
        required=True,
        help="the directory to write: must not exist, and must not be, lie in or contain the "
        "base model or --adapter",
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is an earlier export of this tool (it holds the marker file "
        ".tiedlora_export.json); anything else is refused. The new export is written beside it "
        "and swapped in only when complete",
    )
    e.set_defaults(func=_export)
    return parser


def _report(error: Exception) -> int:
    """One line and exit status 2 for a known failure (checkpoint, export, config, I/O, bad
    text); anything else is a bug and keeps its traceback."""
    from tiedlora_megatron.finetune.cli import failure_message

    message = failure_message(error)
    if message is None:
        raise error
    print(f"tiedlora-megatron: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
