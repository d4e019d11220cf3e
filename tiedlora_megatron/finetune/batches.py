"""The job's data: the splits loaded and tokenised on every rank at once, their checks, and
micro-batches fed to megatron-core's schedules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.finetune.checks import token_multiple, validation_examples
from tiedlora_megatron.finetune.config import JobConfig
from tiedlora_megatron.finetune.progress import is_rank0

#: Built-in tasks whose files are fetched into a cache on first use, with the function that
#: fetches them (and returns at once when cached). Rank 0 runs it before every rank loads the
#: data at once; tasks not listed here (gsm: generated) need nothing fetched.
_FETCHED_TASKS = {"squad": ("tiedlora_megatron.data.tasks", "squad_json")}


@dataclass
class Split:
    examples: list  # tiedlora_megatron.data.Example
    samples: list  # tiedlora_megatron.data.Sample, for the examples that fit max_length
    dropped: int


def _uses_task(cfg: JobConfig, names: Sequence[str]) -> bool:
    return cfg.data.task is not None and any(getattr(cfg.data, n) is None for n in names)


def load_splits(cfg: JobConfig, tokenizer, names: Sequence[str]) -> dict[str, Split]:
    from tiedlora_megatron.data import get_task, load_jsonl, tokenize

    d = cfg.data
    out = {}
    for name in dict.fromkeys(names):
        path = getattr(d, name)
        if path is not None:
            examples = load_jsonl(path)
        elif d.task is not None:
            examples = get_task(d.task).load(name)
        else:
            continue
        samples, dropped = tokenize(
            examples, tokenizer, template=d.template, max_length=d.max_length
        )
        out[name] = Split(examples, samples, dropped)
    return out


def load_splits_every_rank(cfg: JobConfig, tokenizer, names: Sequence[str]) -> dict[str, Split]:
    """`load_splits` on every rank at once. A task whose files are fetched on first use is
    fetched by rank 0 alone first (one download, not one per rank; the cache file is written
    atomically), and only then do all ranks read and tokenise."""
    import importlib

    from tiedlora_megatron.atomic import raise_on_every_rank
    from tiedlora_megatron.data import DataError

    fetch = _FETCHED_TASKS.get(cfg.data.task or "") if _uses_task(cfg, names) else None
    if fetch is not None:
        error = None
        if is_rank0():
            try:
                getattr(importlib.import_module(fetch[0]), fetch[1])()
            except DataError as e:
                error = e
        raise_on_every_rank(error, f"fetching the {cfg.data.task} data failed on rank 0")
    return load_splits(cfg, tokenizer, names)


def split_source(cfg: JobConfig, name: str) -> str:
    """Where split `name` comes from, for messages."""
    path = getattr(cfg.data, name)
    return f"data.{name}={path}" if path is not None else f"the {cfg.data.task} task's {name} split"


def validation_count(cfg: JobConfig, split: Split, dp_size: int) -> int:
    """How many validation examples the validation loss uses: whole micro-batches on every
    data-parallel rank. A ConfigError naming the split and what it needs when that is none."""
    count, unit = validation_examples(cfg, len(split.samples), dp_size)
    if count == 0:
        raise ConfigError(
            f"validation: {split_source(cfg, 'validation')} has {len(split.samples)} usable "
            f"examples ({split.dropped} over data.max_length={cfg.data.max_length} tokens dropped)"
            f" and eval.val_examples={cfg.eval.val_examples}; the validation loss needs at least "
            f"train.micro_batch x data-parallel size = {unit}: add examples, raise "
            "data.max_length, or lower train.micro_batch"
        )
    return count


def _pad_length(samples: Sequence, cfg: JobConfig) -> int:
    """The padded length of a micro-batch: fixed with PP, a multiple of TP with SP (each rank
    holds length / TP tokens), and with FP8 such that every rank's tokens fill FP8's GEMM tiles."""
    if cfg.data.seq_length is not None:
        return cfg.data.seq_length
    pp = cfg.parallel.pp > 1
    length = cfg.data.max_length if pp else max(s.length - 1 for s in samples)
    multiple = token_multiple(cfg)
    return -(-length // multiple) * multiple


def micro_batches(
    samples: Sequence, cfg: JobConfig, pad_id: int, device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Collated micro-batches of `cfg.train.micro_batch` samples, and their padded length."""
    from tiedlora_megatron.data import collate

    mb = cfg.train.micro_batch
    length = _pad_length(samples, cfg)
    batches = []
    for i in range(0, len(samples), mb):
        batch = collate(samples[i : i + mb], pad_id, pad_to=length)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches, length


def run_schedule(model: list[nn.Module], batches, length: int, cfg: JobConfig, fwd, only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=fwd,
        data_iterator=iterators,
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=length,
        micro_batch_size=cfg.train.micro_batch,
        forward_only=only,
    )
