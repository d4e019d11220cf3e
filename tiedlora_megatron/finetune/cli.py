"""Command line of the fine-tuning job.

    torchrun --nproc-per-node 2 -m tiedlora_megatron.finetune train --config job.yaml parallel.tp=2
    python -m tiedlora_megatron.finetune eval --config job.yaml --adapter runs/x/checkpoints/step_0000100
    python -m tiedlora_megatron.finetune show --config job.yaml train.steps=10

Everything after the options is a `key=value` override of the YAML. The configuration is checked
before any process group starts, so mistakes fail in seconds with a message naming them.
"""

from __future__ import annotations

import argparse
import os
import sys

from tiedlora_megatron.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiedlora-finetune", description="Tied-LoRA fine-tuning on megatron-core."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "fine-tune (resumes from the output directory's newest checkpoint)"),
        ("eval", "score a base model, or base + adapter checkpoint, on the held-out split"),
        ("show", "print the resolved configuration and exit"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML job configuration (default: built-in defaults)")
        if name == "eval":
            p.add_argument("--adapter", help="adapter checkpoint directory (omit: base model)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")
    return parser


def _error(message: str) -> int:
    if os.environ.get("RANK", "0") == "0":
        print(f"tiedlora-finetune: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tiedlora_megatron.finetune.config import load_job_config, validate

    try:
        cfg = load_job_config(args.config, args.overrides)
        if args.command == "show":
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        validate(cfg)
    except ConfigError as e:
        return _error(str(e))

    from tiedlora_megatron.data import DataError
    from tiedlora_megatron.finetune import job

    try:
        if args.command == "train":
            job.train(cfg)
        else:
            job.evaluate_checkpoint(cfg, args.adapter)
    except (ConfigError, DataError) as e:  # found only once the model or data is open
        return _error(str(e))
    finally:
        job.shutdown()
    return 0
