"""Evaluation: the validation loss on megatron-core's forward-only schedule, greedy answers
generated over data-parallel ranks and scored, and the job's closing table."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.finetune.batches import Split, micro_batches, run_schedule, validation_count
from tiedlora_megatron.finetune.build import Runtime
from tiedlora_megatron.finetune.config import JobConfig
from tiedlora_megatron.finetune.loss import AnswerPositions, make_forward_step, reduce_losses
from tiedlora_megatron.finetune.progress import format_seconds, log
from tiedlora_megatron.pipeline import unwrap


@torch.no_grad()
def validation_loss(model, split: Split, cfg: JobConfig, rt: Runtime, tokenizer) -> float:
    """Mean answer-token loss over the first `eval.val_examples` validation examples."""
    n = validation_count(cfg, split, rt.dp_size)
    mine = split.samples[rt.dp_rank : n : rt.dp_size]
    positions = AnswerPositions(model)
    try:
        for m in model:
            m.eval()
        batches, length = micro_batches(mine, cfg, tokenizer.pad_id, rt.device)
        out = run_schedule(model, batches, length, cfg, make_forward_step(positions), True)
        total = reduce_losses(out, rt.device)
    finally:
        positions.remove()
        for m in model:
            m.train()
    return float(total[0] / total[1])


def _clean_answer(text: str, first_line: bool) -> str:
    """Short answers end at the first line break; worked solutions (math) are kept whole."""
    text = text.strip()
    return text.split("\n")[0].strip() if first_line else text


@torch.no_grad()
def generate_predictions(chunks, examples: list, cfg: JobConfig, rt: Runtime, tokenizer, task):
    """Greedy answers for `examples`, sharded over data-parallel ranks; every rank gets all."""
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.data import tokenize
    from tiedlora_megatron.models import generate

    raw = [unwrap(c) for c in chunks]
    vocab = raw[0].vocab_size
    max_new = cfg.eval.max_new_tokens or (task.max_new_tokens if task else 64)
    samples, _ = tokenize(examples, tokenizer, template=cfg.data.template, max_length=10**9)
    order = list(range(rt.dp_rank, len(samples), rt.dp_size))
    order.sort(key=lambda i: len(samples[i].prompt_ids))  # less left padding per batch
    first_line = task is None or "accuracy" not in task.metrics
    stop = list(tokenizer.eos_token_ids)
    if first_line:  # a short answer is over at its line break: stop generating there
        stop += [ids[0] for ids in map(tokenizer.encode, ("\n", "\n\n")) if len(ids) == 1]
    mine: dict[int, str] = {}
    for m in raw:
        m.eval()
    began = last = time.perf_counter()
    lengths = [len(s.prompt_ids) for s in samples]
    # TE's attention applies no padding mask under the causal / no-mask types megatron's TE spec
    # uses, so there a batch holds prompts of one length only (nothing to pad).
    batches = generation_batches(order, lengths, cfg.eval.batch_size, cfg.model.spec == "te")
    try:
        done = 0
        for idx in batches:
            if time.perf_counter() - last > 10:  # a line every ~10 s; rank 0's shard stands for all
                last = time.perf_counter()
                rate = done / (last - began)
                log(
                    f"generating answers: {done}/{len(order)} (rank 0's share), "
                    f"{rate:.2f}/s, ETA {format_seconds((len(order) - done) / rate)}"
                )
            done += len(idx)
            outs = generate(
                raw,
                [list(samples[i].prompt_ids) for i in idx],
                vocab_size=vocab,
                max_new_tokens=max_new,
                eos_token_ids=stop,
                pad_id=tokenizer.pad_id,
            )
            for i, ids in zip(idx, outs, strict=True):
                mine[i] = _clean_answer(tokenizer.decode(ids), first_line)
    finally:
        for m in raw:
            m.train()
    gathered: list[dict[int, str]] = [{} for _ in range(rt.dp_size)]
    dist.all_gather_object(gathered, mine, group=ps.get_data_parallel_group())
    merged = {k: v for part in gathered for k, v in part.items()}
    return [merged[i] for i in range(len(samples))]


def generation_batches(
    order: Sequence[int], lengths: Sequence[int], size: int, same_length: bool
) -> list[list[int]]:
    """`order` cut into batches of at most `size` prompts (indices into `lengths`); with
    `same_length`, a new batch also starts wherever the prompt length changes."""
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last is None or len(last) == size or (same_length and lengths[last[0]] != lengths[i]):
            batches.append([i])
        else:
            last.append(i)
    return batches


@contextlib.contextmanager
def fp8_disabled(chunks: Sequence[nn.Module]) -> Iterator[None]:
    """Run `chunks` without FP8 inside the block: greedy decoding feeds TE one token per
    sequence, too few for FP8's GEMM tiles, and scoring answers needs no FP8 speed. megatron
    enters FP8 per forward from `config.fp8`, so clearing it on the models' configs suffices."""
    from megatron.core.transformer import TransformerConfig

    configs = {
        id(c): c
        for chunk in chunks
        for module in chunk.modules()
        if isinstance(c := getattr(module, "config", None), TransformerConfig)
    }
    saved = {key: c.fp8 for key, c in configs.items()}
    for c in configs.values():
        c.fp8 = None
    try:
        yield
    finally:
        for key, c in configs.items():
            c.fp8 = saved[key]


def evaluate(model, splits: dict[str, Split], cfg: JobConfig, rt: Runtime, tokenizer) -> dict:
    """Validation loss and, unless disabled, task metrics on generated answers."""
    from tiedlora_megatron.data import get_task, score

    result: dict[str, Any] = {}
    if "validation" in splits:
        result["val_loss"] = validation_loss(model, splits["validation"], cfg, rt, tokenizer)
    split = splits.get(cfg.eval.split)
    if cfg.eval.num_examples >= 0 and split is not None:
        examples = split.examples
        if cfg.eval.num_examples:
            examples = examples[: cfg.eval.num_examples]
        task = get_task(cfg.data.task) if cfg.data.task else None
        with fp8_disabled(model):
            preds = generate_predictions(model, examples, cfg, rt, tokenizer, task)
        refs = [list(e.references) or [e.answer] for e in examples]
        # JSONL data without a task is scored like short-answer QA: exact match and F1.
        metrics = score(cfg.data.task or "squad", preds, refs)
        result.update(metrics)
        result["eval_examples"] = len(examples)
        result["samples"] = [
            {"prediction": p, "references": r} for p, r in zip(preds[:5], refs[:5], strict=True)
        ]
    return result


def metrics_text(result: dict[str, Any]) -> str:
    keys = [k for k in result if isinstance(result[k], float)]
    return ", ".join(
        f"{k} {result[k]:.3f}" if k == "val_loss" else f"{k} {result[k]:.1f}" for k in keys
    )


def summary_table(s: dict[str, Any]) -> str:
    """The job's closing table: scores before / after and the parameter budget."""
    rows = [("base model", s["base"]), ("tuned", s["tuned"])]
    keys = [k for k in (s["tuned"] or {}) if isinstance(s["tuned"][k], float)]
    header = f"{'':<12}" + "".join(f"{k:>12}" for k in keys)
    lines = ["", header]
    for name, result in rows:
        if result is None:
            continue
        lines.append(f"{name:<12}" + "".join(f"{result.get(k, float('nan')):>12.3f}" for k in keys))
    lines += [
        "",
        f"trainable parameters: {s['trainable_parameters']:,} "
        f"({100 * s['ratio_to_lora']:.1f} % of LoRA's {s['lora_parameters']:,} at rank "
        f"{s['rank']} on {','.join(s['target_modules'])})",
        f"{s['steps']} steps in {format_seconds(s['train_seconds'])} "
        f"(job {format_seconds(s['job_seconds'])}), final train loss {s['final_train_loss']:.4f}",
    ]
    return "\n".join(lines)
