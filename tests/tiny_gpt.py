"""Tiny megatron-core GPT models and megatron-driven training steps for the tests.

Everything runs through megatron-core's own machinery (GPTModel with the local spec, DDP,
get_megatron_optimizer, get_forward_backward_func, finalize_model_grads), as users run it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB, SEQ, MICRO_BATCH = 128, 16, 2


def gpt_config(tp: int = 1, pp: int = 1, sp: bool = False, **overrides):
    from megatron.core.transformer import TransformerConfig

    from tiedlora_megatron.spec import unfused_settings

    values = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **unfused_settings(),
    )
    values.update(overrides)
    return TransformerConfig(**values)


def build_gpt(
    config, seed: int = 1234, pre_process: bool = True, post_process: bool = True, vp_stage=None
):
    """A GPTModel on the local spec (with sequence-parallel norms); weights from `seed`."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tiedlora_megatron.spec import gpt_block_spec

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return GPTModel(
        config,
        transformer_layer_spec=gpt_block_spec(config, vp_stage=vp_stage),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        vp_stage=vp_stage,
    )


def build_chunks(config, seed: int = 1234) -> list:
    """This rank's model chunks (one per virtual pipeline stage) for the current layout."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_gpt(config, seed, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())]
    return [
        build_gpt(
            config,
            seed,
            ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
            ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i),
            vp_stage=i,
        )
        for i in range(vpp)
    ]


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` micro-batches of (tokens, labels), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        # clone: the schedule divides the returned loss in place by the number of micro-batches
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def wrap_ddp(chunks, config, **ddp_kwargs):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(**ddp_kwargs)
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def make_optimizer(ddp_chunks, lr: float = 1e-2, optimizer: str = "adam", **kwargs):
    """megatron's optimizer over the chunks' trainable parameters. Exactness checks use SGD
    with momentum: Adam divides by sqrt(v), which turns fp32 rounding in near-zero gradient
    entries into relative differences of 1e-3."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer=optimizer, lr=lr, weight_decay=0.0, params_dtype=torch.float32, **kwargs
    )
    return get_megatron_optimizer(cfg, ddp_chunks)


def train_step(
    ddp_chunks, optimizer, micro_batches, config, finalize: str = "ours"
) -> tuple[float | None, float]:
    """One optimizer step over `micro_batches` with megatron's schedule. Returns (mean loss on
    the last pipeline stage else None, grad norm).

    `finalize` is how gradients are finalised, as trainers do it: "ours"
    (`tiedlora_megatron.finalize_model_grads` as `config.finalize_model_grads_func`),
    "megatron" (megatron-core's own there, as Megatron-LM and Megatron-Bridge set it) or
    "megatron_direct" (no config hook; the loop calls megatron-core's after the schedule)."""
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    from tiedlora_megatron import finalize_model_grads

    config.finalize_model_grads_func = {
        "ours": finalize_model_grads,
        "megatron": megatron_finalize,
        "megatron_direct": None,
    }[finalize]
    config.no_sync_func = (
        [c.no_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    )
    for c in ddp_chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _run_schedule(ddp_chunks, micro_batches, forward_only=False)
    if finalize == "megatron_direct":
        megatron_finalize(ddp_chunks)
    _, grad_norm, _ = optimizer.step()
    loss = sum(float(x["loss"]) for x in losses) / len(micro_batches) if losses else None
    return loss, float(grad_norm)


def init_layout(tp: int = 1, pp: int = 1, vpp: int | None = None, **overrides):
    """Initialise megatron's parallel state for a layout; return its tiny GPT config (8 layers).

    Interleaved runs use unbatched p2p on two groups, as Megatron-LM does by default: with
    PP = 2 the previous and next stage are the same rank."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    if vpp is not None:
        overrides.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    overrides.setdefault("num_layers", 8)
    return gpt_config(
        tp=tp,
        pp=pp,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=torch.float32,
        **overrides,
    )


def save_base(chunk, ckpt_dir: str) -> None:
    """Save a TP1 x PP1 base model with megatron's dist_checkpointing (layout-free on disk)."""
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(chunk.sharded_state_dict(), ckpt_dir)


def write_base(ckpt_dir: str, seed: int = 7, **model) -> None:
    """Build the tiny GPT (`model`: gpt_config overrides) at TP = PP = 1 from `seed` and save
    it with `save_base`: a base that every layout under test then loads."""
    from megatron.core import parallel_state as ps

    config = init_layout(**model)
    try:
        save_base(build_chunks(config, seed=seed)[0], ckpt_dir)
    finally:
        ps.destroy_model_parallel()


def load_base(chunks, ckpt_dir: str) -> None:
    """Load base weights into this layout's chunks (one load: megatron validates coverage)."""
    from megatron.core import dist_checkpointing

    sharded = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    state = dist_checkpointing.load(sharded, ckpt_dir)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"])


def eval_losses(ddp_chunks, micro_batches) -> list[float] | None:
    """Per-micro-batch losses of a forward-only pass (None off the last pipeline stage)."""
    out = _run_schedule(ddp_chunks, micro_batches, forward_only=True)
    return [float(x["loss"]) for x in out] if out else None


def _run_schedule(ddp_chunks, micro_batches, forward_only: bool) -> list[dict]:
    """megatron's schedule for this layout over `micro_batches` (each chunk its own iterator)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    several = len(ddp_chunks) > 1
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in ddp_chunks] if several else iter(micro_batches),
        model=ddp_chunks if several else ddp_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )
