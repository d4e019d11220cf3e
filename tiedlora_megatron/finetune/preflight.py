"""Checks before a launch, in one process before torchrun starts any rank: everything
`checks.validate` checks for the launch's process count, plus what is worth one process reading
first (the data files, the validation split's size, the output directory's writability and
whether another job holds it). The launch scripts run them through
`tiedlora-finetune show --check --nproc N`.
"""

from __future__ import annotations

import os
from pathlib import Path

from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.finetune.checks import (
    tokenizer_path,
    validate,
    validation_examples,
    world_size_from_env,
)
from tiedlora_megatron.finetune.config import JobConfig
from tiedlora_megatron.finetune.outdir import OutputDirLock


def check_output_dir(path: str | os.PathLike) -> None:
    """`path` is, or can be made, a writable directory: a probe file is written (and removed)
    in it or in its nearest existing parent. Creates nothing else."""
    import tempfile

    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"train.output_dir {path} exists and is not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"train.output_dir {path}: {probe} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".tiedlora-probe-") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(
            f"train.output_dir {path} is not writable ({probe}: {e.strerror or e})"
        ) from None


def check_data_files(cfg: JobConfig, world_size: int) -> None:
    """Read every JSONL file the job names (format, UTF-8, chat roles), tokenise the train and
    validation files, and check that they fill a global batch and a validation batch."""
    from tiedlora_megatron.data import load_jsonl, tokenize

    d, t = cfg.data, cfg.train
    files = {s: getattr(d, s) for s in ("train", "validation", "test") if getattr(d, s)}
    loaded = {split: load_jsonl(path) for split, path in files.items()}
    if not {"train", "validation"} & set(loaded):
        return
    from tiedlora_megatron.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_path(cfg.model))
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)

    def usable(split: str) -> int:
        samples, _ = tokenize(
            loaded[split], tokenizer, template=d.template, max_length=d.max_length
        )
        return len(samples)

    if "train" in loaded:
        n = usable("train")
        if n < t.global_batch:
            raise ConfigError(
                f"data.train {files['train']} has {n} examples within data.max_length="
                f"{d.max_length} tokens, fewer than train.global_batch={t.global_batch}"
            )
    if "validation" in loaded:
        n = usable("validation")
        count, unit = validation_examples(cfg, n, dp)
        if count == 0:
            raise ConfigError(
                f"data.validation {files['validation']} has {n} examples within data.max_length="
                f"{d.max_length} tokens (eval.val_examples={cfg.eval.val_examples}), fewer than "
                f"train.micro_batch x data-parallel size = {t.micro_batch} x {dp} = {unit}"
            )


def preflight(cfg: JobConfig, world_size: int | None = None) -> None:
    """Everything `validate` checks for `world_size` processes, plus what is worth one process
    reading before a launch: the data files, the validation split's size and the output
    directory's writability. The launch scripts run it (`show --check`) before torchrun."""
    world = world_size if world_size is not None else world_size_from_env()
    if world < 1:
        raise ConfigError(f"the process count (--nproc) must be >= 1, got {world}")
    validate(cfg, world)
    check_output_dir(cfg.train.output_dir)
    OutputDirLock(Path(cfg.train.output_dir)).check_free()
    check_data_files(cfg, world)
