"""The fine-tuning job on megatron-core's own machinery, from a validated `JobConfig`.

One process per rank (torchrun). The base model loads at the configured TP / PP / virtual-PP
layout, adapters are added and everything else is frozen; megatron-core's DDP, optimizer
(distributed optimizer selectable), `get_forward_backward_func` schedules, gradient clipping and
`OptimizerParamScheduler` (warm-up + cosine) train the adapters, with tied-factor gradients summed
over pipeline replicas by `tiedlora_megatron.finalize_model_grads`.

Resume is exact: the data order and every random draw are pure functions of (seed, step), and
adapter checkpoints hold the optimizer and scheduler state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.atomic import write_json_atomic
from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.finetune.config import JobConfig, token_multiple
from tiedlora_megatron.finetune.loss import AnswerPositions, make_forward_step, reduce_losses
from tiedlora_megatron.finetune.progress import Progress, Scalars, format_seconds, is_rank0, log
from tiedlora_megatron.pipeline import unwrap

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"


# ---- process groups ---------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this rank runs."""

    device: torch.device
    cpu: bool
    dp_rank: int
    dp_size: int


def init_distributed(cfg: JobConfig) -> Runtime:
    """Process group (gloo on CPU, NCCL on GPU) and megatron's parallel state for `cfg`."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tiedlora_megatron.runtime import enable_cpu_runtime, free_port

    cpu = enable_cpu_runtime()
    if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )  # fmt: skip
    if cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if cpu else "nccl")
    p = cfg.parallel
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
    )
    model_parallel_cuda_manual_seed(cfg.train.seed)
    return Runtime(device, cpu, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- model --------------------------------------------------------------------------------------


def _dtype(cfg: JobConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32


def _config_overrides(cfg: JobConfig) -> dict[str, Any]:
    """TransformerConfig fields for training at the configured layout and precision."""
    over: dict[str, Any] = {
        "sequence_parallel": cfg.parallel.sp,
        "calculate_per_token_loss": True,
    }
    if cfg.parallel.vpp is not None:
        # Megatron-LM's settings for the interleaved schedule (with PP = 2 the previous and
        # next stage are one rank; batched p2p would mix activations and gradients).
        over.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if cfg.model.recompute == "full":
        over.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif cfg.model.recompute == "selective":
        over.update(recompute_granularity="selective")
    if cfg.precision.fp8 is not None:
        over.update(fp8=cfg.precision.fp8, fp8_recipe=cfg.precision.fp8_recipe)
    return over


def load_base(cfg: JobConfig):
    """This rank's base-model chunks, model info and tokenizer."""
    from tiedlora_megatron import models

    m, dtype, over = cfg.model, _dtype(cfg), _config_overrides(cfg)
    if m.source == "smollm2":
        chunks, info = models.load_smollm2(dtype, over, m.spec)
        tokenizer_path = m.tokenizer or models.default_smollm2_path()
    elif m.source == "hf":
        chunks, info = models.load_hf_model(m.path, dtype, over, m.spec)
        tokenizer_path = m.tokenizer or m.path
    elif m.source == "gguf":
        chunks, info = models.load_gguf_model(m.path, dtype, over, m.spec)
        tokenizer_path = m.tokenizer or m.path
    else:
        chunks, info = models.load_megatron_model(m.path, dtype, config_overrides=over)
        tokenizer_path = m.tokenizer
        if tokenizer_path is None:
            raise ConfigError("model.source=megatron needs model.tokenizer (an HF dir or GGUF)")
    return chunks, info, models.load_tokenizer(tokenizer_path)


def wrap_for_training(cfg: JobConfig, chunks: list[nn.Module], rt: Runtime) -> list[nn.Module]:
    """Float16Module (bf16) and megatron DDP around each chunk, as Megatron-LM does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from tiedlora_megatron import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        if not rt.cpu:
            chunk.cuda(rt.device)
        module = Float16Module(chunk.config, chunk) if cfg.precision.dtype == "bf16" else chunk
        wrapped.append(
            DistributedDataParallel(chunk.config, ddp_config, module, disable_bucketing=i > 0)
        )
        wrapped[-1].train()
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if cfg.parallel.overlap_grad_reduce:
        sync = [c.no_sync for c in wrapped]
        config.no_sync_func = sync if len(sync) > 1 else sync[0]
    return wrapped


def build_optimizer(cfg: JobConfig, model: list[nn.Module]):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optim, cfg.train.steps
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=cfg.precision.dtype == "bf16",
            params_dtype=_dtype(cfg),
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=o.decay,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


# ---- data ---------------------------------------------------------------------------------------


@dataclass
class Split:
    examples: list  # tiedlora_megatron.data.Example
    samples: list  # tiedlora_megatron.data.Sample, for the examples that fit max_length
    dropped: int


def load_splits(cfg: JobConfig, tokenizer, names: Sequence[str]) -> dict[str, Split]:
    from tiedlora_megatron.data import get_task, load_jsonl, tokenize

    d = cfg.data
    out = {}
    for name in names:
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


def load_splits_rank0_first(cfg: JobConfig, tokenizer, names: Sequence[str]) -> dict[str, Split]:
    """`load_splits`, on rank 0 first: a task fetched on first use downloads once, not per rank."""
    from tiedlora_megatron.atomic import raise_on_every_rank
    from tiedlora_megatron.data import DataError

    splits, error = None, None
    if is_rank0():
        try:
            splits = load_splits(cfg, tokenizer, names)
        except DataError as e:
            error = e
    raise_on_every_rank(error, "loading the data failed on rank 0")
    return splits if splits is not None else load_splits(cfg, tokenizer, names)


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


def _run_schedule(model: list[nn.Module], batches, length: int, cfg: JobConfig, fwd, only: bool):
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


# ---- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, split: Split, cfg: JobConfig, rt: Runtime, tokenizer) -> float:
    """Mean answer-token loss over the first `eval.val_examples` validation examples."""
    n = len(split.samples) if cfg.eval.val_examples == 0 else cfg.eval.val_examples
    unit = cfg.train.micro_batch * rt.dp_size  # every pipeline sees whole micro-batches
    n = min(n, len(split.samples)) // unit * unit
    if n == 0:
        raise ConfigError(
            f"validation split has {len(split.samples)} usable examples, fewer than "
            f"micro_batch x data-parallel size = {unit}"
        )
    mine = split.samples[rt.dp_rank : n : rt.dp_size]
    positions = AnswerPositions(model)
    try:
        for m in model:
            m.eval()
        batches, length = micro_batches(mine, cfg, tokenizer.pad_id, rt.device)
        out = _run_schedule(model, batches, length, cfg, make_forward_step(positions), True)
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


# ---- checkpoints --------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (a save is complete once it has its metadata)."""
    from tiedlora_megatron.checkpoint import METADATA_FILE

    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if (p / METADATA_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def _prune(output_dir: Path, keep: int, final_step: int) -> None:
    if not is_rank0():
        return
    old = [p for p in checkpoint_dirs(output_dir) if p.name != f"{STEP_PREFIX}{final_step:07d}"]
    for p in old[: max(len(old) - keep, 0)]:
        shutil.rmtree(p)


def resume_path(cfg: JobConfig, output_dir: Path) -> Path | None:
    existing = checkpoint_dirs(output_dir)
    if cfg.train.resume == "never":
        if existing:
            raise ConfigError(
                f"{output_dir} already has checkpoints ({existing[-1].name}); set "
                "train.resume=auto to continue that run, or choose another train.output_dir"
            )
        return None
    if cfg.train.resume == "auto":
        return existing[-1] if existing else None
    return Path(cfg.train.resume)


# ---- the training loop --------------------------------------------------------------------------


def _seed_step(seed: int, step: int) -> None:
    """Every random draw of a step (adapter dropout) depends only on (seed, step)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed * 1_000_003 + step)


def _lora_count(cfg: JobConfig, chunks) -> int:
    from tiedlora_megatron import TiedLoRAConfig, count_trainable_parameters
    from tiedlora_megatron.checkpoint import model_dims

    a = cfg.adapter
    lora = TiedLoRAConfig.preset("lora", rank=a.rank, target_modules=list(a.target_modules))
    return count_trainable_parameters(lora, model_dims(chunks))


def train(cfg: JobConfig) -> dict[str, Any]:
    """Run the job described by `cfg` (already validated); returns the summary on every rank."""
    from tiedlora_megatron import apply_tied_lora
    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
    from tiedlora_megatron.data import BatchSchedule

    t0 = time.perf_counter()
    rt = init_distributed(cfg)
    output_dir = Path(cfg.train.output_dir)
    resume = resume_path(cfg, output_dir)
    if is_rank0():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "config.json", cfg.to_dict())

    chunks, info, tokenizer = load_base(cfg)
    adapters = apply_tied_lora(chunks, cfg.adapter_config())
    model = wrap_for_training(cfg, chunks, rt)
    optimizer, scheduler = build_optimizer(cfg, model)
    splits = load_splits_rank0_first(cfg, tokenizer, ("train", "validation", cfg.eval.split))
    train_split = splits["train"]
    log(
        f"model {info.format}:{info.path} ({info.arch.num_layers} layers, hidden "
        f"{info.arch.hidden_size}) | adapter {cfg.adapter.preset} r={cfg.adapter.rank} on "
        f"{','.join(cfg.adapter.target_modules)} | layout TP={cfg.parallel.tp} PP={cfg.parallel.pp}"
        f" VPP={cfg.parallel.vpp or 1} DP={rt.dp_size} SP={cfg.parallel.sp} | "
        f"{cfg.precision.dtype} | {len(train_split.samples)} train examples "
        f"({train_split.dropped} over {cfg.data.max_length} tokens dropped)"
    )
    schedule = BatchSchedule(
        [s.length for s in train_split.samples],
        cfg.train.global_batch,
        seed=cfg.data.seed,
        bucket=cfg.data.bucket,
    )

    step = 0
    if resume is not None:
        meta = load_adapter_checkpoint(
            resume, model, adapters, optimizer=optimizer, scheduler=scheduler
        )
        step = int(meta["step"])
        log(f"resumed from {resume} at step {step}")

    base_file = output_dir / "base_eval.json"
    base_eval = None
    if cfg.eval.before:
        if base_file.is_file():
            base_eval = json.loads(base_file.read_text())
        elif step == 0:
            log("evaluating the base model (adapters at their zero start) ...")
            base_eval = evaluate(model, splits, cfg, rt, tokenizer)
            if is_rank0():
                write_json_atomic(base_file, base_eval)
            log(f"base: {_metrics_text(base_eval)}")

    scalars = Scalars(output_dir)
    progress = Progress(step, cfg.train.steps)
    positions = AnswerPositions(model)
    forward_step = make_forward_step(positions)
    last_loss = float("nan")
    try:
        while step < cfg.train.steps:
            _seed_step(cfg.train.seed, step)
            local = schedule.local_indices(step, rt.dp_rank, rt.dp_size)
            batches, length = micro_batches(
                [train_split.samples[i] for i in local], cfg, tokenizer.pad_id, rt.device
            )
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            out = _run_schedule(model, batches, length, cfg, forward_step, False)
            lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it next)
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            step += 1
            total = reduce_losses(out, rt.device)
            last_loss = float(total[0] / total[1])
            tokens = sum(
                train_split.samples[i].length for i in schedule.global_batch_indices(step - 1)
            )
            values = {"loss": last_loss, "lr": lr, "grad_norm": float(grad_norm or 0.0)}
            scalars.add(step, {**values, "tokens": tokens})
            line = progress.line(step, tokens, values)
            if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                log(line)
            if not ok:
                log(f"step {step}: optimizer step skipped (non-finite gradients)")
            interval = cfg.train.eval_interval
            if interval and step % interval == 0 and step < cfg.train.steps:
                val = validation_loss(model, splits["validation"], cfg, rt, tokenizer)
                scalars.add(step, {"val_loss": val})
                log(f"step {step}: validation loss {val:.4f}")
            save_every, exit_every = cfg.train.save_interval, cfg.train.exit_interval
            stop = bool(exit_every) and step % exit_every == 0 and step < cfg.train.steps
            if step == cfg.train.steps or stop or (save_every and step % save_every == 0):
                path = output_dir / CHECKPOINTS / f"{STEP_PREFIX}{step:07d}"
                save_adapter_checkpoint(
                    path, model, adapters, optimizer=optimizer, scheduler=scheduler, step=step,
                    extra={"job": cfg.to_dict()}, overwrite=True,
                )  # fmt: skip
                _prune(output_dir, cfg.train.keep_checkpoints, cfg.train.steps)
            if stop:
                log(f"step {step}: exit_interval reached; rerun the same command to resume")
                return {"steps": step, "stopped": True}
    finally:
        positions.remove()
        scalars.close()

    log("evaluating the tuned model ...")
    final = evaluate(model, splits, cfg, rt, tokenizer)
    trainable = adapters.num_trainable_parameters()
    lora = _lora_count(cfg, chunks)
    summary = {
        "preset": cfg.adapter.preset,
        "rank": cfg.adapter.rank,
        "target_modules": list(cfg.adapter.target_modules),
        "trainable_parameters": trainable,
        "lora_parameters": lora,
        "ratio_to_lora": trainable / lora,
        "steps": step,
        "final_train_loss": last_loss,
        "train_seconds": progress.elapsed,
        "job_seconds": time.perf_counter() - t0,
        "base": base_eval,
        "tuned": final,
        "layout": dataclasses.asdict(cfg.parallel),
        "world_size": dist.get_world_size(),
    }
    if is_rank0():
        write_json_atomic(output_dir / "summary.json", summary)
    log(summary_table(summary))
    return summary


def _metrics_text(result: dict[str, Any]) -> str:
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


def evaluate_checkpoint(cfg: JobConfig, adapter: str | None) -> dict[str, Any]:
    """Score the base model, or the base model with the adapter checkpoint `adapter`."""
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, read_metadata

    rt = init_distributed(cfg)
    chunks, info, tokenizer = load_base(cfg)
    if not rt.cpu:
        for c in chunks:
            c.cuda(rt.device)
    name = "base model"
    if adapter is not None:
        meta = read_metadata(adapter)
        adapters = apply_tied_lora(chunks, TiedLoRAConfig.from_dict(meta["adapter_config"]))
        load_adapter_checkpoint(adapter, chunks, adapters)
        name = f"{adapter} (step {meta['step']})"
    splits = load_splits_rank0_first(cfg, tokenizer, ("validation", cfg.eval.split))
    result = evaluate(chunks, splits, cfg, rt, tokenizer)
    result["model"] = f"{info.format}:{info.path}"
    result["adapter"] = adapter
    if is_rank0():
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = "eval_base" if adapter is None else f"eval_{Path(adapter).name}"
        write_json_atomic(out / f"{stem}.json", result)
    log(f"{name} on {cfg.data.task or cfg.data.test} ({cfg.eval.split}): {_metrics_text(result)}")
    return result
