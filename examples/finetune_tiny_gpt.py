"""Fine-tune a tiny megatron-core GPT with Tied-LoRA under torchrun, on CPU or GPU.

    torchrun --nproc-per-node 2 examples/finetune_tiny_gpt.py --preset vBuA --tp 2

The base model is first trained briefly on one synthetic task (next token = token + 1), then
frozen; the adapters learn a second task (next token = token + 3) through megatron-core's
schedule, DDP, optimizer and gradient finalisation, at any tensor / sequence / pipeline layout.
Rank 0 logs loss, tokens/s and ETA, then a summary with the trainable-parameter count against
LoRA's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB, SEQ, MICRO_BATCH = 64, 32, 8


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def _batches(
    shift: int, n: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (MICRO_BATCH, 1), generator=generator)
        tokens = (start + shift * torch.arange(SEQ + 1)) % VOCAB
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, None, labels=labels)

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="vBuA")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--base-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-2)
    args = parser.parse_args()

    from tiedlora_megatron.runtime import enable_cpu_runtime

    cpu = enable_cpu_runtime()
    dist.init_process_group("gloo" if cpu else "nccl")
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from tiedlora_megatron import (
        ModelDims,
        TiedLoRAConfig,
        apply_tied_lora,
        count_trainable_parameters,
        finalize_model_grads,
    )
    from tiedlora_megatron.spec import gpt_block_spec, unfused_settings

    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", add_bias_linear=False, tensor_model_parallel_size=args.tp,
        sequence_parallel=args.sequence_parallel, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, **unfused_settings(),
    )  # fmt: skip
    model = GPTModel(
        config, gpt_block_spec(config), vocab_size=VOCAB, max_sequence_length=SEQ,
        position_embedding_type="rope",
    )  # fmt: skip
    if not cpu:
        model.cuda()
    generator = torch.Generator().manual_seed(0)

    def run(ddp, optimizer, shift: int, steps: int, label: str) -> list[float]:
        config.finalize_model_grads_func = finalize_model_grads
        losses, start = [], time.perf_counter()
        for step in range(1, steps + 1):
            data = _batches(shift, 2, generator)
            if not cpu:
                data = [(t.cuda(), y.cuda()) for t, y in data]
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            out = get_forward_backward_func()(
                forward_step_func=_forward_step, data_iterator=iter(data), model=ddp,
                num_microbatches=len(data), seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                forward_only=False,
            )  # fmt: skip
            optimizer.step()
            losses.append(sum(float(x["loss"]) for x in out) / len(out))
            if step % 10 == 0 or step == steps:
                elapsed = time.perf_counter() - start
                tokens = step * len(data) * MICRO_BATCH * SEQ
                _log(
                    f"[{label}] step {step}/{steps}  loss {losses[-1]:.3f}  "
                    f"{tokens / elapsed:,.0f} tokens/s  ETA {elapsed / step * (steps - step):.0f} s"
                )
        return losses

    def optimizer_for(ddp):
        return get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=1.0), [ddp]
        )

    # 1. A base model that knows one task.
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    run(ddp, optimizer_for(ddp), shift=1, steps=args.base_steps, label="base")
    # 2. Tied-LoRA on the frozen base, for a second task.
    cfg = TiedLoRAConfig.preset(
        args.preset, rank=args.rank, alpha=2 * args.rank,
        target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
    )  # fmt: skip
    adapters = apply_tied_lora(model, cfg)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    losses = run(ddp, optimizer_for(ddp), shift=3, steps=args.steps, label=args.preset)

    dims = ModelDims.from_transformer_config(config)
    lora = TiedLoRAConfig.preset("lora", rank=args.rank, target_modules=cfg.target_modules)
    n, n_lora = adapters.num_trainable_parameters(), count_trainable_parameters(lora, dims)
    _log(
        f"\n{args.preset} (factors {cfg.factors}, tied={cfg.tied}) at TP={args.tp}: "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} on the new task\n"
        f"trainable parameters: {n:,} ({100 * n / n_lora:.1f} % of LoRA's {n_lora:,} "
        "on the same targets and rank)"
    )
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
