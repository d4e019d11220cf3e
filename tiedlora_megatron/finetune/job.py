"""The fine-tuning job on megatron-core's own machinery, from a validated `JobConfig`.

One process per rank (torchrun). The base model loads at the configured TP / PP / virtual-PP
layout, adapters are added and everything else is frozen; megatron-core's DDP, optimizer
(distributed optimizer selectable), `get_forward_backward_func` schedules, gradient clipping and
`OptimizerParamScheduler` (warm-up + cosine) train the adapters, with tied-factor gradients summed
over pipeline replicas by `tiedlora_megatron.finalize_model_grads`.

Resume is exact: the data order and every random draw are pure functions of (seed, step), and
adapter checkpoints hold the optimizer and scheduler state. The output directory is locked
(`outdir`), a rerun must match its checkpoint's configuration (`checkpoints`), and SIGTERM /
SIGUSR1 save and stop after the current step (`preemption`). The pieces: `build` (process
groups, model, optimizer), `batches` (data), `evaluation`, `checkpoints`, `outdir`,
`preemption`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tiedlora_megatron.atomic import write_json_atomic
from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.finetune.batches import (
    _pad_length,
    load_splits_every_rank,
    micro_batches,
    run_schedule,
    split_source,
    validation_count,
)
from tiedlora_megatron.finetune.build import (
    build_optimizer,
    init_distributed,
    load_base,
    shutdown,
    wrap_for_training,
)
from tiedlora_megatron.finetune.checkpoints import (
    CHECKPOINTS,
    STEP_PREFIX,
    checkpoint_dirs,
    checkpoint_name,
    choose_resume,
    prune,
    trim_metrics,
)
from tiedlora_megatron.finetune.config import JobConfig
from tiedlora_megatron.finetune.evaluation import (
    evaluate,
    fp8_disabled,
    generation_batches,
    metrics_text,
    summary_table,
    validation_loss,
)
from tiedlora_megatron.finetune.loss import AnswerPositions, make_forward_step, reduce_losses
from tiedlora_megatron.finetune.outdir import OutputDirLock, on_rank0
from tiedlora_megatron.finetune.preemption import StopRequest
from tiedlora_megatron.finetune.progress import (
    PhaseTimes,
    Progress,
    Scalars,
    is_rank0,
    log,
    timing_text,
)

__all__ = [
    "CHECKPOINTS",
    "STEP_PREFIX",
    "_pad_length",
    "checkpoint_dirs",
    "evaluate_checkpoint",
    "fp8_disabled",
    "generation_batches",
    "shutdown",
    "summary_table",
    "train",
]


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
    """Run the job described by `cfg` (already validated); returns the summary on every rank
    (or `{"steps", "stopped": True}` when it saved and stopped early)."""
    rt = init_distributed(cfg)
    output_dir = Path(cfg.train.output_dir)
    lock = OutputDirLock(output_dir)
    on_rank0(lock.acquire)  # before anything is written there; every rank fails if it fails
    try:
        return _train(cfg, rt, output_dir)
    finally:
        if is_rank0():
            lock.release()


def _log_data(cfg: JobConfig, splits: dict, dp_size: int) -> None:
    """The data's sizes and drops; the validation split checked before any training."""
    parts = []
    for name, split in splits.items():
        parts.append(
            f"{len(split.samples)} {name} examples ({split.dropped} over "
            f"{cfg.data.max_length} tokens dropped)"
        )
    log(f"data: {'; '.join(parts)}")
    if "validation" in splits:
        validation_count(cfg, splits["validation"], dp_size)
    if not splits["train"].samples:
        raise ConfigError(
            f"train: {split_source(cfg, 'train')} has no example within data.max_length="
            f"{cfg.data.max_length} tokens ({splits['train'].dropped} dropped)"
        )


def _train(cfg: JobConfig, rt, output_dir: Path) -> dict[str, Any]:
    from tiedlora_megatron import apply_tied_lora
    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
    from tiedlora_megatron.data import BatchSchedule

    t0 = time.perf_counter()
    times = PhaseTimes()
    resume = on_rank0(lambda: choose_resume(cfg, output_dir))
    if is_rank0():
        write_json_atomic(output_dir / "config.json", cfg.to_dict())

    chunks, info, tokenizer = load_base(cfg)
    adapters = apply_tied_lora(chunks, cfg.adapter_config())
    model = wrap_for_training(cfg, chunks, rt)
    optimizer, scheduler = build_optimizer(cfg, model)
    splits = load_splits_every_rank(cfg, tokenizer, ("train", "validation", cfg.eval.split))
    train_split = splits["train"]
    experts = f", {info.arch.num_moe_experts} experts" if info.arch.num_moe_experts else ""
    par = cfg.parallel
    ep = f" EP={par.ep} ETP={par.etp}" if info.arch.num_moe_experts else ""
    log(
        f"model {info.format}:{info.path} ({info.arch.num_layers} layers, hidden "
        f"{info.arch.hidden_size}{experts}) | adapter {cfg.adapter.preset} r={cfg.adapter.rank} "
        f"on {','.join(cfg.adapter.target_modules)} | layout TP={cfg.parallel.tp} "
        f"PP={cfg.parallel.pp} VPP={cfg.parallel.vpp or 1} DP={rt.dp_size}{ep} "
        f"SP={cfg.parallel.sp} | {cfg.precision.dtype}"
    )
    _log_data(cfg, splits, rt.dp_size)
    schedule = BatchSchedule(
        [s.length for s in train_split.samples],
        cfg.train.global_batch,
        seed=cfg.data.seed,
        bucket=cfg.data.bucket,
    )

    step = resume.step
    if resume.path is not None:
        # Under a changed configuration the schedule is the new one's, at the checkpoint's step.
        load_adapter_checkpoint(
            resume.path, model, adapters, optimizer=optimizer,
            scheduler=None if resume.rebuild_schedule else scheduler,
        )  # fmt: skip
        if resume.rebuild_schedule:
            scheduler.step(increment=step)
        log(f"resumed from {resume.path} at step {step}")
    trim_metrics(output_dir, step)
    times.add("load", time.perf_counter() - t0)

    base_file = output_dir / "base_eval.json"
    base_eval = None
    if cfg.eval.before:
        if base_file.is_file():
            base_eval = json.loads(base_file.read_text())
        elif step == 0:
            log("evaluating the base model (adapters at their zero start) ...")
            with times("base_eval"):
                base_eval = evaluate(
                    model, splits, cfg, rt, tokenizer, output_dir / "predictions_base.jsonl"
                )
            if is_rank0():
                write_json_atomic(base_file, base_eval)
            log(f"base: {metrics_text(base_eval)}")

    scalars = Scalars(output_dir, first_step=step)
    progress = Progress(step, cfg.train.steps)
    positions = AnswerPositions(model)
    forward_step = make_forward_step(positions)
    # A resumed run carries on the training time and last loss its checkpoint recorded.
    trained_before = float(resume.progress.get("train_seconds", 0.0))
    last_loss = float(resume.progress.get("train_loss", float("nan")))
    try:
        with StopRequest(rt.device) as stop_request:
            while step < cfg.train.steps:
                with times("train"):
                    _seed_step(cfg.train.seed, step)
                    local = schedule.local_indices(step, rt.dp_rank, rt.dp_size)
                    batches, length = micro_batches(
                        [train_split.samples[i] for i in local], cfg, tokenizer.pad_id, rt.device
                    )
                    for m in model:
                        m.zero_grad_buffer()
                    optimizer.zero_grad()
                    out = run_schedule(model, batches, length, cfg, forward_step, False)
                    lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it)
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
                    with times("validation"):
                        val = validation_loss(model, splits["validation"], cfg, rt, tokenizer)
                    scalars.add(step, {"val_loss": val})
                    log(f"step {step}: validation loss {val:.4f}")
                signalled = stop_request.agreed()  # every rank stops after the same step
                save_every, exit_every = cfg.train.save_interval, cfg.train.exit_interval
                stop = bool(exit_every) and step % exit_every == 0 and step < cfg.train.steps
                periodic = bool(save_every) and step % save_every == 0
                path = output_dir / CHECKPOINTS / checkpoint_name(step)
                if step == cfg.train.steps or stop or signalled or periodic:
                    so_far = {"train_seconds": trained_before + times.seconds["train"],
                              "train_loss": last_loss}  # fmt: skip
                    with stop_request.deferred(), times("save"):
                        save_adapter_checkpoint(
                            path, model, adapters, optimizer=optimizer, scheduler=scheduler,
                            step=step, extra={"job": cfg.to_dict(), "progress": so_far},
                            overwrite=True,
                        )  # fmt: skip
                        prune(output_dir, cfg.train.keep_checkpoints, cfg.train.steps)
                if signalled:
                    log(
                        f"step {step}: {signalled} received; saved {path}, exiting (rerun the "
                        "same command to resume)"
                    )
                    return {"steps": step, "stopped": True, "signal": signalled}
                if stop:
                    log(f"step {step}: exit_interval reached; rerun the same command to resume")
                    return {"steps": step, "stopped": True}
    finally:
        positions.remove()
        scalars.close()

    log("evaluating the tuned model ...")
    with times("final_eval"):
        final = evaluate(model, splits, cfg, rt, tokenizer, output_dir / "predictions_tuned.jsonl")
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
        "steps_this_run": step - resume.step,
        "final_train_loss": last_loss,
        "train_seconds": trained_before + times.seconds.get("train", 0.0),
        "seconds": times.seconds,
        "job_seconds": time.perf_counter() - t0,
        "base": base_eval,
        "tuned": final,
        "layout": dataclasses.asdict(cfg.parallel),
        "world_size": dist.get_world_size(),
    }
    if is_rank0():
        write_json_atomic(output_dir / "summary.json", summary)
    log(summary_table(summary))
    log(timing_text(summary))
    return summary


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
    splits = load_splits_every_rank(cfg, tokenizer, ("validation", cfg.eval.split))
    out = Path(cfg.train.output_dir)
    stem = "eval_base" if adapter is None else f"eval_{Path(adapter).name}"
    if is_rank0():
        out.mkdir(parents=True, exist_ok=True)
    result = evaluate(chunks, splits, cfg, rt, tokenizer, out / f"{stem}_predictions.jsonl")
    result["model"] = f"{info.format}:{info.path}"
    result["adapter"] = adapter
    if is_rank0():
        write_json_atomic(out / f"{stem}.json", result)
    log(f"{name} on {cfg.data.task or cfg.data.test} ({cfg.eval.split}): {metrics_text(result)}")
    return result
