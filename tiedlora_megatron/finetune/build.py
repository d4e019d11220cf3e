"""What a job runs on: the process groups, the base model with adapters under megatron DDP, and
megatron-core's optimizer with its warm-up + cosine `OptimizerParamScheduler`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tiedlora_megatron.finetune.checks import tokenizer_path
from tiedlora_megatron.finetune.config import JobConfig


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
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
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
    tokenizer = tokenizer_path(m)
    if m.source == "smollm2":
        chunks, info = models.load_smollm2(dtype, over, m.spec)
    elif m.source == "hf":
        chunks, info = models.load_hf_model(m.path, dtype, over, m.spec)
    elif m.source == "gguf":
        chunks, info = models.load_gguf_model(m.path, dtype, over, m.spec)
    else:
        chunks, info = models.load_megatron_model(m.path, dtype, config_overrides=over)
    return chunks, info, models.load_tokenizer(tokenizer)


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
