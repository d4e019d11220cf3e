"""Tied-LoRA on megatron-core's Transformer Engine GPT spec, on a CUDA machine with TE.

    python -m tests.gpu.check_te                            # 1 GPU: TP = 1
    torchrun --nproc-per-node 2 -m tests.gpu.check_te       # 2 GPUs: TP = 2, sequence parallel

(from the repository root; needs megatron-core, Transformer Engine and a CUDA torch).

A small GPT is built twice with identical weights: on megatron-core's TE spec
(`get_gpt_layer_with_transformer_engine_spec`: TELayerNormColumnParallelLinear for linear_qkv
and linear_fc1, TERowParallelLinear for linear_proj and linear_fc2) and on the local spec. Both
get vBuA adapters on all four targets with identical non-zero factors. Checked, in bf16:
- the base logits agree, and so do the adapted logits (which differ from the base ones);
- the adapter gradients agree;
then, on the TE model under `fp8_autocast(DelayedScaling(fp8_format=Format.HYBRID))`:
- the base TE layers run in FP8 and the adapters' outputs are plain bf16 tensors;
- every trained adapter parameter gets a finite gradient, and the loss falls over a few steps.
Prints a table and exits with status 1 if any check fails.

Tolerances (bf16; relative error is ||got - want|| / ||want|| over this rank's shard): logits
2e-2, adapter gradients 5e-2 - the two models differ in attention and norm kernels and in
bf16 rounding order, not in what they compute; the adapters must move the logits by at least
10x the logits tolerance, so that agreement is not agreement of two unadapted models.
"""

from __future__ import annotations

import os
import socket
import sys
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEED, VOCAB, SEQ, BATCH, STEPS = 1234, 256, 64, 2, 6
LOGITS_TOL, GRAD_TOL = 2e-2, 5e-2
ADAPTED_MIN = 10 * LOGITS_TOL
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
# Local spec norm -> the TE layer that fuses it (state-dict key prefixes).
FUSED_NORMS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def init_distributed() -> int:
    """Start NCCL (a one-process group when not under torchrun) and megatron's TP = world."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    model_parallel_cuda_manual_seed(SEED)
    return dist.get_world_size()


def build(tp: int, te: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from tiedlora_megatron.spec import gpt_block_spec, unfused_settings

    config = TransformerConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=256,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=True,  # linear_fc1 then returns its bias: TE's 3-tuple form is used
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        params_dtype=torch.bfloat16,
        bf16=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **unfused_settings(),
    )
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)
    spec = get_gpt_layer_with_transformer_engine_spec() if te else gpt_block_spec(config)
    model = GPTModel(
        config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    # bf16 throughout, as megatron's Float16Module casts it (the local spec's torch norms are
    # built in fp32).
    return model.cuda().bfloat16()


def copy_local_to_te(local, te) -> None:
    """Give the TE model the local model's weights (the fused norms under their TE names)."""
    te_state = {k: v for k, v in te.state_dict().items() if not k.endswith("_extra_state")}
    mapped = {}
    for name, value in local.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        for norm, fused in FUSED_NORMS.items():
            name = name.replace(norm, fused)
        mapped[name] = value
    if mapped.keys() != te_state.keys():
        raise RuntimeError(
            f"state dicts differ: local only {sorted(mapped.keys() - te_state.keys())}, "
            f"TE only {sorted(te_state.keys() - mapped.keys())}"
        )
    with torch.no_grad():
        for name, value in mapped.items():
            te_state[name].copy_(value)


def set_adapters(adapters) -> None:
    """Every adapter tensor N(0, 0.3^2), seeded by its name: the same in both models."""
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def logits_and_loss(model, tokens, labels):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    positions = torch.arange(SEQ, device=tokens.device).expand_as(tokens)
    logits = model(tokens, positions, None)
    loss = vocab_parallel_cross_entropy(logits.float(), labels).mean()
    return logits, loss


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, the largest over the TP ranks."""
    t = torch.tensor(
        [(got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)],
        device="cuda",
    )
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def reduce_sequence_parallel_grads(params) -> None:
    """Sum over TP the grads that sequence parallelism leaves partial (finalize_model_grads'
    job, done here by hand because the models are not wrapped in megatron's DDP)."""
    from megatron.core import parallel_state as ps

    for p in params:
        if p.grad is not None and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())


def main() -> int:
    from transformer_engine.common.recipe import DelayedScaling, Format
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager, fp8_autocast

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.te import require_te, te_layer_name

    tp = init_distributed()
    rows: list[tuple[str, str, str, bool]] = []

    def check(name: str, value: float | str, bound: str, ok: bool) -> None:
        shown = f"{value:.3e}" if isinstance(value, float) else value
        rows.append((name, shown, bound, bool(ok)))

    local, te = build(tp, te=False), build(tp, te=True)
    copy_local_to_te(local, te)
    g = torch.Generator().manual_seed(SEED)
    data = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g).cuda()
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    with torch.no_grad():
        base_local, _ = logits_and_loss(local, tokens, labels)
        base_te, _ = logits_and_loss(te, tokens, labels)
    err = rel(base_te, base_local)
    check("base logits, TE vs local", err, f"<= {LOGITS_TOL}", err <= LOGITS_TOL)

    cfg = TiedLoRAConfig.preset("vBuA", rank=8, alpha=16, target_modules=TARGETS)
    ad_local, ad_te = apply_tied_lora(local, cfg), apply_tied_lora(te, cfg)
    set_adapters(ad_local)
    set_adapters(ad_te)
    logits_local, loss_local = logits_and_loss(local, tokens, labels)
    logits_te, loss_te = logits_and_loss(te, tokens, labels)
    loss_local.backward()
    loss_te.backward()
    moved = rel(logits_te.detach(), base_te)
    check("adapted vs base logits (TE)", moved, f">= {ADAPTED_MIN}", moved >= ADAPTED_MIN)
    err = rel(logits_te.detach(), logits_local.detach())
    check("adapted logits, TE vs local", err, f"<= {LOGITS_TOL}", err <= LOGITS_TOL)
    grads_local = {name: p.grad for name, p in ad_local.named_parameters()}
    errors = {
        name: rel(p.grad, grads_local[name])
        for name, p in ad_te.named_parameters()
        if p.requires_grad
    }
    worst = max(errors, key=errors.__getitem__)
    check(
        f"adapter grads, TE vs local (worst: {worst})",
        errors[worst],
        f"<= {GRAD_TOL}",
        errors[worst] <= GRAD_TOL,
    )

    # FP8: the base runs in FP8, the adapters in bf16.
    seen: list[tuple[bool, bool]] = []
    for adapter in (a for chunk in ad_te.adapters for a in chunk.values()):

        def recording(x, gather=None, _delta=adapter.delta):
            y = _delta(x, gather)
            plain_bf16 = type(y) is torch.Tensor and y.dtype == torch.bfloat16
            seen.append((plain_bf16, FP8GlobalStateManager.is_fp8_enabled()))
            return y

        adapter.delta = recording
    params = list(ad_te.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    recipe = DelayedScaling(fp8_format=Format.HYBRID)
    te_linears = [m for m in te.modules() if te_layer_name(m) is not None]
    losses, finite = [], True
    for _ in range(STEPS):
        # Recast the FP8 weight copies each step, as megatron's schedule does
        # (MegatronModule.set_is_first_microbatch, which acts only when config.fp8 is set).
        for m in te_linears:
            m.is_first_microbatch = True
        optimizer.zero_grad()
        with fp8_autocast(enabled=True, fp8_recipe=recipe):
            _, loss = logits_and_loss(te, tokens, labels)
        loss.backward()
        reduce_sequence_parallel_grads(params)
        finite &= all(p.grad is not None and bool(p.grad.isfinite().all()) for p in params)
        optimizer.step()
        losses.append(float(loss))
    in_fp8 = [bool(m.fp8) for m in te_linears]
    check("TE linear layers ran in FP8", f"{sum(in_fp8)}/{len(in_fp8)}", "all", all(in_fp8))
    bf16_in_fp8 = [plain and fp8 for plain, fp8 in seen]
    check(
        "adapter outputs plain bf16, inside fp8_autocast",
        f"{sum(bf16_in_fp8)}/{len(bf16_in_fp8)}",
        "all",
        bool(seen) and all(bf16_in_fp8),
    )
    check("adapter grads finite under FP8", str(finite), "True", finite)
    check(
        "FP8 loss first -> last",
        f"{losses[0]:.4f} -> {losses[-1]:.4f}",
        "falls",
        losses[-1] < losses[0],
    )

    if dist.get_rank() == 0:
        device = torch.cuda.get_device_name()
        print(f"TE {require_te()}, TP={tp}, sequence parallel={tp > 1}, {device}")
        width = max(len(r[0]) for r in rows)
        for name, value, bound, ok in rows:
            print(f"{'PASS' if ok else 'FAIL'} {name:<{width}}  {value:>16}  {bound}")
    failed = not all(r[3] for r in rows)
    dist.destroy_process_group()
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
