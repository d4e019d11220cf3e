"""Evaluation: the validation loss on megatron-core's forward-only schedule, greedy answers
generated over data-parallel ranks and scored, the job's closing table, and `eval --data`
(`evaluate_file`): any JSONL file scored without a task, every prediction kept in
`<train.output_dir>/eval/<file stem>/<checkpoint>/predictions.jsonl` beside `result.json`."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.data import (
    METRIC_SETS,
    DataError,
    clean_answer,
    example_scores,
    load_jsonl,
    score_metrics,
)
from tiedlora_megatron.finetune.batches import (
    Split,
    micro_batches,
    run_schedule,
    split_source,
    validation_count,
)
from tiedlora_megatron.finetune.build import Runtime, init_distributed, load_base
from tiedlora_megatron.finetune.config import JobConfig
from tiedlora_megatron.finetune.loss import AnswerPositions, make_forward_step, reduce_losses
from tiedlora_megatron.finetune.progress import format_seconds, is_rank0, log
from tiedlora_megatron.pipeline import unwrap

#: Tokens generated for a short answer (`eval --data`) unless eval.max_new_tokens says otherwise.
SHORT_ANSWER_TOKENS = 32


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


def _check_lengths(lengths: Sequence[int], max_new: int, limit: int, source: str) -> None:
    """A prompt that leaves no room for the answer fails before any generation, by number."""
    for i, n in enumerate(lengths):
        if n + max_new > limit:
            raise DataError(
                f"{source}: example {i + 1} has a {n}-token prompt; with {max_new} new tokens "
                f"(eval.max_new_tokens) it needs {n + max_new} positions, the model has {limit}"
            )


@torch.no_grad()
def generate_answers(
    chunks, examples: list, cfg: JobConfig, rt: Runtime, tokenizer, *, short: bool,
    max_new: int, source: str,
) -> list[str]:  # fmt: skip
    """Greedy continuations (decoded, not yet cleaned) of `examples`' prompts, sharded over
    data-parallel ranks; every rank gets all, in example order.

    A short answer is over at its line break, so generation stops there, unless everything
    before it cleans to nothing (blank lines, a bare "Answer:"): base models often begin with a
    line break, and stopping there would score an empty answer. Such continuations go on from
    where they stopped (greedy decoding is deterministic) until an answer line is complete or
    `max_new` tokens are spent.
    """
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.data import tokenize
    from tiedlora_megatron.models import generate

    raw = [unwrap(c) for c in chunks]
    vocab = raw[0].vocab_size
    samples, _ = tokenize(examples, tokenizer, template=cfg.data.template, max_length=10**9)
    prompts = [list(s.prompt_ids) for s in samples]
    _check_lengths([len(p) for p in prompts], max_new, raw[0].max_sequence_length, source)
    stop = list(tokenizer.eos_token_ids)
    newline: set[int] = set()
    if short:  # a short answer is over at its line break: stop generating there
        newline = {ids[0] for ids in map(tokenizer.encode, ("\n", "\n\n")) if len(ids) == 1}
        stop += sorted(newline)
    mine = list(range(rt.dp_rank, len(samples), rt.dp_size))
    generated: dict[int, list[int]] = {i: [] for i in mine}
    for m in raw:
        m.eval()
    began = last = time.perf_counter()
    done, pending = 0, mine
    try:
        while pending:
            again = []
            # Continuations of one length share their token budget; batches hold similar
            # lengths (less left padding). TE's attention applies no padding mask under the
            # causal / no-mask types megatron's TE spec uses, so there a batch holds prompts of
            # one length only (nothing to pad).
            by_budget: dict[int, list[int]] = {}
            for i in pending:
                by_budget.setdefault(max_new - len(generated[i]), []).append(i)
            lengths = {i: len(prompts[i]) + len(generated[i]) for i in pending}
            for budget, group in by_budget.items():
                group.sort(key=lengths.__getitem__)
                for idx in generation_batches(
                    group, lengths, cfg.eval.batch_size, cfg.model.spec == "te"
                ):
                    if time.perf_counter() - last > 10:  # a line every ~10 s, rank 0's share
                        last = time.perf_counter()
                        rate = done / (last - began)
                        log(
                            f"generating answers: {done}/{len(mine)} (rank 0's share), "
                            f"{rate:.2f}/s, ETA {format_seconds((len(mine) - done) / rate)}"
                        )
                    outs = generate(
                        raw,
                        [prompts[i] + generated[i] for i in idx],
                        vocab_size=vocab,
                        max_new_tokens=budget,
                        eos_token_ids=stop,
                        pad_id=tokenizer.pad_id,
                    )
                    for i, ids in zip(idx, outs, strict=True):
                        done += not generated[i]
                        generated[i] += ids
                        text = tokenizer.decode(generated[i])
                        if (
                            ids
                            and ids[-1] in newline
                            and len(generated[i]) < max_new
                            and not clean_answer(text, short)
                        ):
                            again.append(i)
            pending = again
    finally:
        for m in raw:
            m.train()
    texts = {i: tokenizer.decode(ids) for i, ids in generated.items()}
    gathered: list[dict[int, str]] = [{} for _ in range(rt.dp_size)]
    dist.all_gather_object(gathered, texts, group=ps.get_data_parallel_group())
    merged = {k: v for part in gathered for k, v in part.items()}
    return [merged[i] for i in range(len(samples))]


def generation_batches(
    order: Sequence[int], lengths: Sequence[int] | Mapping[int, int], size: int, same_length: bool
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


def evaluate(
    model,
    splits: dict[str, Split],
    cfg: JobConfig,
    rt: Runtime,
    tokenizer,
    predictions: Path | None = None,
) -> dict:
    """Validation loss and, unless disabled, task metrics on generated answers. Every answer
    goes to the JSONL file `predictions` (rank 0) when given; the result keeps the first 5."""
    from tiedlora_megatron.atomic import write_jsonl_atomic
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
        # JSONL data without a task is scored like short-answer QA: exact match and F1.
        short = task is None or task.short_answer
        max_new = cfg.eval.max_new_tokens or (task.max_new_tokens if task else 64)
        source = split_source(cfg, cfg.eval.split)
        with fp8_disabled(model):
            texts = generate_answers(
                model, examples, cfg, rt, tokenizer, short=short, max_new=max_new, source=source
            )
        preds = [clean_answer(t, short) for t in texts]
        refs = [list(e.references) or [e.answer] for e in examples]
        metrics = score(cfg.data.task or "squad", preds, refs)
        result.update(metrics)
        result["eval_examples"] = len(examples)
        result["samples"] = [
            {"prediction": p, "references": r} for p, r in zip(preds[:5], refs[:5], strict=True)
        ]
        if predictions is not None:
            rows = [
                {"index": i, "prompt": e.prompt, "generated": t, "prediction": p, "references": r}
                for i, (e, t, p, r) in enumerate(zip(examples, texts, preds, refs, strict=True))
            ]
            if is_rank0():
                write_jsonl_atomic(predictions, rows)
            result["predictions"] = predictions.name
    return result


# ---- eval --data: any JSONL file, every prediction kept ------------------------------------------

#: Where `eval --data` writes, under `train.output_dir`: eval/<file stem>/<checkpoint>/.
EVAL_DIR = "eval"
RESULT_FILE = "result.json"
PREDICTIONS_FILE = "predictions.jsonl"
#: What makes two results the same result; another one in the folder is never replaced.
_IDENTITY = ("data", "model", "adapter")


def result_dir(cfg: JobConfig, adapter: str | None) -> Path:
    """`<train.output_dir>/eval/<data file stem>/<'base' | adapter checkpoint name>`: two files
    or two checkpoints scored into one output folder each get their own."""
    tag = "base" if adapter is None else Path(adapter).resolve().name
    return Path(cfg.train.output_dir) / EVAL_DIR / Path(cfg.eval.data).stem / tag


def result_identity(cfg: JobConfig, adapter: str | None) -> dict[str, str | None]:
    """The data file, base model and adapter a result belongs to (absolute paths)."""
    m = cfg.model
    model = f"{m.source}:{Path(m.path).resolve() if m.path else 'SmolLM2-135M-Instruct'}"
    return {
        "data": str(Path(cfg.eval.data).resolve()),
        "model": model,
        "adapter": None if adapter is None else str(Path(adapter).resolve()),
    }


def check_destination(dest: Path, identity: dict[str, str | None]) -> None:
    """Refuse a folder that holds another data file's, model's or checkpoint's result (the same
    one scored again is replaced: a rerun); create its parent, so an unwritable output folder
    fails before any generation."""
    from tiedlora_megatron.config import ConfigError

    result = dest / RESULT_FILE
    if result.is_file():
        try:
            old = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if not isinstance(old, dict):
            old = {}
        differs = [k for k in _IDENTITY if old.get(k) != identity[k]]
        if differs:
            was = ", ".join(f"{k} {old.get(k, '?')}" for k in differs)
            now = ", ".join(f"{k} {identity[k]}" for k in differs)
            raise ConfigError(
                f"{dest} holds the result of another run ({was}; this one: {now}): move or "
                "delete that folder, or choose another train.output_dir"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)


def write_result(dest: Path, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """predictions.jsonl and result.json, complete or not at all: written in a hidden folder
    beside `dest` that then replaces it."""
    from tiedlora_megatron.atomic import replace_dir, write_json_atomic, write_jsonl_atomic

    partial = dest.parent / f".{dest.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_jsonl_atomic(partial / PREDICTIONS_FILE, rows)
    write_json_atomic(partial / RESULT_FILE, result)
    replace_dir(partial, dest)


def _load_model(cfg: JobConfig, rt: Runtime, adapter: str | None):
    """The base model's chunks (with the adapter checkpoint loaded), tokenizer, and a name and
    step for messages."""
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, read_metadata

    chunks, _, tokenizer = load_base(cfg)
    if not rt.cpu:
        for c in chunks:
            c.cuda(rt.device)
    if adapter is None:
        return chunks, tokenizer, "base model", None
    meta = read_metadata(adapter)
    adapters = apply_tied_lora(chunks, TiedLoRAConfig.from_dict(meta["adapter_config"]))
    load_adapter_checkpoint(adapter, chunks, adapters)
    return chunks, tokenizer, f"{adapter} (step {meta['step']})", meta["step"]


def evaluate_file(cfg: JobConfig, adapter: str | None) -> dict[str, Any]:
    """`eval --data FILE [--metric M]`: score the base model, or base + adapter checkpoint, on
    the JSONL file `eval.data` alone (no task, no other split, no validation loss). Every
    prediction goes to predictions.jsonl beside result.json in `result_dir`."""
    from tiedlora_megatron.finetune.outdir import on_rank0

    path = Path(cfg.eval.data)
    metric = cfg.eval.metric or "squad"
    names = METRIC_SETS[metric]
    examples = load_jsonl(path)  # before any process group: a bad line fails in seconds
    if cfg.data.template == "plain" and any(not isinstance(e.prompt, str) for e in examples):
        raise DataError(f"{path}: chat ('messages') examples need data.template=chat")
    if metric == "number":  # a reference that is no number fails now, not after generating
        for i, e in enumerate(examples):
            try:
                example_scores(names, "0", e.references)
            except DataError as error:
                raise DataError(f"{path}: example {i + 1}: {error}") from None
    dest = result_dir(cfg, adapter)
    identity = result_identity(cfg, adapter)
    rt = init_distributed(cfg)
    on_rank0(lambda: check_destination(dest, identity))
    chunks, tokenizer, name, step = _load_model(cfg, rt, adapter)
    max_new = cfg.eval.max_new_tokens or SHORT_ANSWER_TOKENS
    log(f"{name}: answering {len(examples)} examples of {path} (metric {metric}) ...")
    with fp8_disabled(chunks):
        texts = generate_answers(
            chunks, examples, cfg, rt, tokenizer, short=True, max_new=max_new, source=str(path)
        )
    preds = [clean_answer(t, short=True) for t in texts]
    refs = [list(e.references) for e in examples]
    rows = [
        {
            "index": i, "prompt": e.prompt, "generated": t, "prediction": p, "references": r,
            **example_scores(names, p, r),
        }
        for i, (e, t, p, r) in enumerate(zip(examples, texts, preds, refs, strict=True))
    ]  # fmt: skip
    result: dict[str, Any] = {
        **identity,
        "step": step,
        "metric": metric,
        **score_metrics(names, preds, refs),
        "examples": len(examples),
        "template": cfg.data.template,
        "max_new_tokens": max_new,
        "predictions": PREDICTIONS_FILE,
    }
    on_rank0(lambda: write_result(dest, result, rows))
    log(f"{name} on {path} ({len(examples)} examples): {metrics_text(result)} -> {dest}")
    return result


def metrics_text(result: dict[str, Any]) -> str:
    """The result's float values on one line: the loss to 3 decimals, percentages to 1."""
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
        f"{s['steps']} steps, final train loss {s['final_train_loss']:.4f}",
    ]
    return "\n".join(lines)
