"""megatron-core on CPU/gloo through `enable_cpu_runtime()`, checked against TP1/PP1 references.

Every check runs on one pool of 4 gloo ranks. A rank first computes the reference (the same tiny
GPT at TP1/PP1, in-process), then the parallel run, whose weights are copied from the reference.
"""

from __future__ import annotations

import importlib.util
import itertools
import multiprocessing
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.dist import ProcessGroupPool

WORLD = 4
SEQ = 16
VOCAB = 128
HIDDEN = 64
MBS = 2
SEED = 1234
ADAM_EPS = 1e-2


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessGroupPool]:
    with ProcessGroupPool(WORLD) as p:
        yield p


# ---- model builders and helpers (run on the ranks) ---------------------------------------------


def _config(tp: int = 1, pp: int = 1, vpp: int | None = None, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tiedlora_megatron.spec import unfused_settings

    dtype = torch.bfloat16 if overrides.get("bf16") else torch.float32
    kwargs = dict(
        num_layers=4,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=2 * HIDDEN,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=tp > 1,
        use_cpu_initialization=True,
        perform_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **unfused_settings(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
    )
    if vpp is not None:
        # Megatron-LM's default for the interleaved schedule: with PP = 2 the previous and next
        # stage are the same rank, and batched p2p can swap activations and gradients in flight.
        kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _gpt(config, vp_stage: int | None = None, tied: bool = False, rope: bool = False):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from tiedlora_megatron.spec import gpt_block_spec

    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(
            config, qk_layernorm=config.qk_layernorm, vp_stage=vp_stage
        ),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope" if rope else "learned_absolute",
        vp_stage=vp_stage,
    )


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]})
    return out


def _token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    return model(batch["tokens"], positions, None, labels=batch["labels"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _reference_names(model: torch.nn.Module, tied: bool) -> dict[str, str]:
    """Each parameter's name in the TP1/PP1 reference (global layer numbers, tied output)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layer_prefix = {
        f"{name}.": re.sub(r"\d+$", str(module.layer_number - 1), name) + "."
        for name, module in model.named_modules()
        if isinstance(module, TransformerLayer)
    }
    names = {}
    for name, _ in model.named_parameters():
        ref = name
        for local, global_ in layer_prefix.items():
            if name.startswith(local):
                ref = global_ + name[len(local) :]
        if tied and ref == "output_layer.weight":
            ref = "embedding.word_embeddings.weight"
        names[name] = ref
    return names


def _shard(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of a reference tensor."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = ps.get_tensor_model_parallel_world_size()
    return full.chunk(tp, dim=param.partition_dim)[ps.get_tensor_model_parallel_rank()]


def _load_reference(model: torch.nn.Module, ref: dict[str, torch.Tensor], tied: bool) -> None:
    names = _reference_names(model, tied)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_shard(param, ref[names[name]]))


def _assert_matches_reference(
    model: torch.nn.Module, ref: dict[str, torch.Tensor], tied: bool, what: str, **tol: float
) -> None:
    names = _reference_names(model, tied)
    for name, param in model.named_parameters():
        value = param.main_grad if what == "grad" else param.detach()
        expected = _shard(param, ref[names[name]])
        torch.testing.assert_close(value.float(), expected, msg=f"{what} of {name}", **tol)


def _ddp(config, model, **ddp_kwargs):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(
        config=config, ddp_config=DistributedDataParallelConfig(**ddp_kwargs), module=model
    )


def _reference_run(
    batches: list[dict[str, torch.Tensor]], tied: bool = False, rope: bool = False, **overrides
) -> tuple[dict[str, torch.Tensor], list[float], dict[str, torch.Tensor]]:
    """TP1/PP1: weights, per-microbatch losses and grads of the mean loss over `batches`."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    try:
        model = _gpt(_config(**overrides), tied=tied, rope=rope)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = []
        for batch in batches:
            loss = _token_losses(model, batch).mean()
            (loss / len(batches)).backward()
            losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        ps.destroy_model_parallel()
    return weights, losses, grads


# ---- functions run on every rank ----------------------------------------------------------------


def _check_enabled_and_idempotent() -> None:
    import megatron.core.optimizer.optimizer as mo
    import megatron.core.pipeline_parallel.schedules as schedules

    from tiedlora_megatron.runtime import cpu_runtime_enabled, enable_cpu_runtime

    assert cpu_runtime_enabled()
    before = (
        torch.cuda.current_device,
        schedules.torch,
        mo.Float16OptimizerWithFloat16Params.__init__,
        mo.clip_grad_by_total_norm_fp32,
    )
    assert enable_cpu_runtime()
    after = (
        torch.cuda.current_device,
        schedules.torch,
        mo.Float16OptimizerWithFloat16Params.__init__,
        mo.clip_grad_by_total_norm_fp32,
    )
    assert before == after
    assert torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch is not torch


def _tp_sp_matches_tp1(rope: bool, normalization: str, qk_layernorm: bool) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    kw = dict(normalization=normalization, qk_layernorm=qk_layernorm)
    batches = _batches(1)
    ref_weights, ref_losses, ref_grads = _reference_run(batches, rope=rope, **kw)

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        config = _config(tp=2, **kw)
        gpt = _gpt(config, rope=rope)
        _load_reference(gpt, ref_weights, tied=False)
        norm_params = [p for n, p in gpt.named_parameters() if "layernorm" in n]
        assert norm_params and all(p.sequence_parallel for p in norm_params)
        model = _ddp(config, gpt)
        loss = _token_losses(model, batches[0]).mean()
        loss.backward()
        finalize_model_grads([model])
        assert loss.item() == pytest.approx(ref_losses[0], rel=1e-5)
        _assert_matches_reference(gpt, ref_grads, False, "grad", rtol=1e-4, atol=1e-5)
    finally:
        ps.destroy_model_parallel()


def _forward_step(data_iterator, model):
    from functools import partial

    def loss_func(token_losses: torch.Tensor):
        loss = token_losses.mean()
        # clone: the schedule divides the returned loss by num_microbatches in place
        return loss, {"loss": loss.detach().clone()}

    return _token_losses(model, next(data_iterator)), partial(loss_func)


def _pipeline_matches_pp1(vpp: int | None) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    num_microbatches = 4
    batches = _batches(num_microbatches, seed=1)
    ref_weights, ref_losses, ref_grads = _reference_run(batches, tied=True)

    ps.initialize_model_parallel(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp
    )
    try:
        config = _config(pp=2, vpp=vpp)
        chunks = []
        for vp_stage in range(vpp or 1):
            gpt = _gpt(config, vp_stage=vp_stage if vpp else None, tied=True)
            _load_reference(gpt, ref_weights, tied=True)
            chunks.append(_ddp(config, gpt))
        config.finalize_model_grads_func = finalize_model_grads
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=[iter(batches) for _ in chunks] if vpp else iter(batches),
            model=chunks if vpp else chunks[0],
            num_microbatches=num_microbatches,
            seq_length=SEQ,
            micro_batch_size=MBS,
            forward_only=False,
        )
        if ps.is_pipeline_last_stage():
            got = [d["loss"].item() for d in losses]
            assert got == pytest.approx(ref_losses, rel=1e-5), (got, ref_losses)
        else:
            assert not losses
        for chunk in chunks:
            _assert_matches_reference(_unwrap(chunk), ref_grads, True, "grad", rtol=1e-4, atol=1e-5)
    finally:
        ps.destroy_model_parallel()


def _optimizer_matches_reference(overlap: bool, distributed: bool, bf16: bool) -> float:
    """Two steps on TP2 x DP2 (sequence parallel); returns the last grad norm."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    steps, lr, clip = 2, 1e-2, 0.05
    global_batches = [_batches(2, seed=10 + s) for s in range(steps)]

    # Reference: the full global batch in one process, torch SGD, torch clipping.
    ref_weights, _, _ = _reference_run(global_batches[0][:1])
    ps.initialize_model_parallel()
    try:
        ref = _gpt(_config())
        _load_reference(ref, ref_weights, tied=False)
        # SGD, not Adam: Adam's g/sqrt(v) turns TP1-vs-TP2 rounding of near-zero grads into
        # full-size steps of either sign, so only a linear update rule compares exactly. The
        # distributed optimizer supports only Adam: there an eps above most gradient entries
        # keeps the update close to linear in them.
        if distributed:
            sgd = torch.optim.AdamW(ref.parameters(), lr=lr, eps=ADAM_EPS, weight_decay=0.0)
        else:
            sgd = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
        ref_norms = []
        for batches in global_batches:
            sgd.zero_grad()
            loss = torch.stack([_token_losses(ref, b).mean() for b in batches]).mean()
            loss.backward()
            ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip).item())
            sgd.step()
        ref_final = {n: p.detach().clone() for n, p in ref.named_parameters()}
    finally:
        ps.destroy_model_parallel()

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        config = _config(tp=2, bf16=bf16)
        gpt = _gpt(config)
        _load_reference(gpt, ref_weights, tied=False)
        module = Float16Module(config, gpt) if bf16 else gpt
        model = _ddp(
            config,
            module,
            overlap_grad_reduce=overlap,
            use_distributed_optimizer=distributed,
            grad_reduce_in_fp32=True,
        )
        config.finalize_model_grads_func = finalize_model_grads
        if overlap:
            config.no_sync_func = model.no_sync
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam" if distributed else "sgd",
                sgd_momentum=0.9,
                adam_eps=ADAM_EPS,
                lr=lr,
                weight_decay=0.0,
                clip_grad=clip,
                bf16=bf16,
                params_dtype=config.params_dtype,
                use_distributed_optimizer=distributed,
            ),
            [model],
        )
        dp_rank = ps.get_data_parallel_rank()
        norms = []
        for batches in global_batches:
            model.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(
                forward_step_func=_forward_step,
                data_iterator=iter(batches[dp_rank : dp_rank + 1]),
                model=model,
                num_microbatches=1,
                seq_length=SEQ,
                micro_batch_size=MBS,
                forward_only=False,
            )
            ok, grad_norm, _ = optimizer.step()
            assert ok
            norms.append(grad_norm)
        tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
        assert norms == pytest.approx(ref_norms, rel=tol["rtol"])
        _assert_matches_reference(gpt, ref_final, False, "param", **tol)
        return norms[-1]
    finally:
        ps.destroy_model_parallel()


def _checkpoint_tp2_to_tp1(ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    batch = _batches(1, seed=3)[0]
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        tp2 = _gpt(_config(tp=2))
        with torch.no_grad():
            for p in tp2.parameters():  # move away from the seeded init the TP1 model gets
                p.add_(0.01 * torch.randn_like(p))
            saved = _token_losses(tp2, batch)
        dist_checkpointing.save(tp2.sharded_state_dict(), ckpt_dir)
        # Written in this process: no forked writers, no results Manager left running.
        assert not multiprocessing.active_children(), multiprocessing.active_children()
    finally:
        ps.destroy_model_parallel()

    ps.initialize_model_parallel()
    try:
        tp1 = _gpt(_config())
        state = dist_checkpointing.load(tp1.sharded_state_dict(), ckpt_dir)
        tp1.load_state_dict(state)
        with torch.no_grad():
            loaded = _token_losses(tp1, batch)
        torch.testing.assert_close(loaded, saved, rtol=1e-5, atol=1e-5)
    finally:
        ps.destroy_model_parallel()


# ---- tests --------------------------------------------------------------------------------------


def test_enabled_on_ranks_and_idempotent(pool: ProcessGroupPool) -> None:
    pool.run(_check_enabled_and_idempotent)


@pytest.mark.parametrize(
    ("rope", "normalization", "qk_layernorm"),
    [(False, "LayerNorm", False), (True, "RMSNorm", True)],
)
def test_tp2_sequence_parallel_matches_tp1(
    pool: ProcessGroupPool, rope: bool, normalization: str, qk_layernorm: bool
) -> None:
    pool.run(_tp_sp_matches_tp1, rope, normalization, qk_layernorm)


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_pipeline_matches_pp1(pool: ProcessGroupPool, vpp: int | None) -> None:
    pool.run(_pipeline_matches_pp1, vpp)


@pytest.mark.parametrize(
    ("overlap", "distributed", "bf16"),
    [(o, d, False) for o, d in itertools.product([False, True], repeat=2)]
    + [(True, False, True), (True, True, True)],
)
def test_ddp_optimizer_matches_reference(
    pool: ProcessGroupPool, overlap: bool, distributed: bool, bf16: bool
) -> None:
    norms = pool.run(_optimizer_matches_reference, overlap, distributed, bf16)
    assert len(set(norms)) == 1  # every rank reports the same global grad norm


def test_dist_checkpoint_tp2_loads_at_tp1(pool: ProcessGroupPool, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    pool.run(_checkpoint_tp2_to_tp1, str(ckpt_dir))


def test_noop_when_cuda_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh copy of the module patches nothing and reports disabled where CUDA is present."""
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as random

    import tiedlora_megatron.runtime.cpu as installed

    spec = importlib.util.spec_from_file_location("_fresh_cpu_runtime", installed.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def snapshot() -> tuple:
        return (
            {k: v for k, v in vars(torch.cuda).items() if callable(v)},
            schedules.torch,
            random.torch,
            random._set_cuda_rng_state,
            # megatron-core 0.16 names (forked writers, `_get_write_results_queue`) and 0.19's
            # (threaded writers, `get_write_results_queue`); each version has one pair.
            getattr(fs, "_get_write_results_queue", None),
            getattr(fs.FileSystemWriterAsync, "write_preloaded_data_multiproc", None),
            getattr(fs, "get_write_results_queue", None),
        )

    before = snapshot()
    assert fresh.enable_cpu_runtime() is False
    assert fresh.enable_cpu_runtime() is False
    assert not fresh.cpu_runtime_enabled()
    assert snapshot() == before
