"""Megatron-LM and NeMo-2-style dist checkpoints -> megatron-core at another TP / PP.

Megatron-LM is not installed: a small GPTModel is built at TP 2 with this library's builders and
saved the way Megatron-LM's `save_checkpoint` does (`{'model': sharded_state_dict, 'args': ...}`
under `root/iter_0000100` plus the tracker file), and as NeMo 2's `weights/` (keys prefixed
`module.`, no args). Loading at TP 1 and at PP 2 must reproduce the saved model's logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from tests.dist import ProcessGroupPool

SEQS = [[5, 17, 33, 2, 41, 8, 90, 11], [7, 21, 95, 40, 13]]
PADDED_VOCAB = 128
TOL = 2e-5


def _arch():
    from tiedlora_megatron.models import GPTArch

    return GPTArch(
        family="megatron-lm",
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        vocab_size=PADDED_VOCAB,
        max_position_embeddings=64,
        normalization="RMSNorm",
        norm_eps=1e-5,
        gated_linear_unit=True,
        activation="silu",
        position_embedding_type="rope",
        tie_embeddings=False,
        add_bias_linear=False,
        add_qkv_bias=True,
        rotary_base=500000.0,
    )


def _megatron_lm_args(**overrides) -> argparse.Namespace:
    """What Megatron-LM's `validate_args` leaves for a Llama-style model at TP 2 (a subset)."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    args = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        kv_channels=16,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        bias_gelu_fusion=False,
        bias_swiglu_fusion=True,
        position_embedding_type="rope",
        rotary_base=500000,
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=False,
        untie_embeddings_and_output_weights=True,
        vocab_size=None,
        make_vocab_size_divisible_by=64,
        padded_vocab_size=PADDED_VOCAB,
        max_position_embeddings=64,
        seq_length=64,
        num_experts=None,
        multi_latent_attention=False,
        qk_layernorm=False,
        apply_layernorm_1p=False,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1,
        params_dtype=torch.float32,
        attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder,
        transformer_impl="local",
        ckpt_format="torch_dist",
    )
    return argparse.Namespace(**{**args, **overrides})


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(2) as p:
        yield p


def _init(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(1234)


def _randomize(chunk: torch.nn.Module, tp_rank: int) -> None:
    """Deterministic weights: TP-split params differ per rank, replicated ones agree."""
    for name, param in chunk.named_parameters():
        split = getattr(param, "tensor_model_parallel", False)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + (tp_rank if split else 0))
        noise = torch.randn(param.shape, generator=gen)
        with torch.no_grad():
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)


def _save(root: str) -> list | None:
    """Save one TP 2 model as Megatron-LM and as NeMo 2 would; its logits on rank 0."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import build_model, forward_logits

    _init(2, 1)
    try:
        (model,) = build_model(_arch(), padded_vocab_size=PADDED_VOCAB)
        _randomize(model, ps.get_tensor_model_parallel_rank())
        iter_dir = Path(root) / "megatron_lm" / "iter_0000100"
        nemo_dir = Path(root) / "nemo" / "weights"
        for d in (iter_dir, nemo_dir):
            d.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        state = {
            "model": model.sharded_state_dict(),
            "args": _megatron_lm_args(),
            "iteration": 100,
            "checkpoint_version": 3.0,
            # Optimizer state repeats the weights' names under a longer prefix.
            "optimizer": model.sharded_state_dict(prefix="optimizer.state.exp_avg."),
        }
        dist_checkpointing.save(state, str(iter_dir))
        dist_checkpointing.save(
            {"module": model.sharded_state_dict(prefix="module.")}, str(nemo_dir)
        )
        if torch.distributed.get_rank() == 0:
            (Path(root) / "megatron_lm" / "latest_checkpointed_iteration.txt").write_text("100")
        logits = forward_logits([model], SEQS, PADDED_VOCAB)
    finally:
        ps.destroy_model_parallel()
    return logits.tolist() if torch.distributed.get_rank() == 0 else None


def _load(path: str, tp: int, pp: int, explicit_arch: bool) -> tuple[list | None, dict]:
    """Logits of the loaded model on last-stage ranks (else None) and the arch it was given."""
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import forward_logits, load_megatron_model

    _init(tp, pp)
    try:
        chunks, info = load_megatron_model(path, arch=_arch() if explicit_arch else None)
        logits = forward_logits(chunks, SEQS, info.arch.vocab_size)
    finally:
        ps.destroy_model_parallel()
    return (None if logits is None else logits.tolist()), info.arch.to_dict()


@pytest.fixture(scope="module")
def saved(pool, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("megatron_lm")
    return root, torch.tensor(pool.run(_save, str(root))[0])


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)])
def test_megatron_lm_checkpoint_loads_at_another_tp_pp(pool, saved, tp, pp):
    root, ref = saved
    results = pool.run(_load, str(root / "megatron_lm"), tp, pp, False)
    errors = [(torch.tensor(lg) - ref).abs().max().item() for lg, _ in results if lg is not None]
    assert errors and max(errors) < TOL
    assert results[0][1] == _arch().to_dict()  # every setting came from the saved args


def test_nemo2_weights_load_with_explicit_arch(pool, saved):
    root, ref = saved
    results = pool.run(_load, str(root / "nemo"), 1, 2, True)
    errors = [(torch.tensor(lg) - ref).abs().max().item() for lg, _ in results if lg is not None]
    assert errors and max(errors) < TOL


def _error(path: str) -> str:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import load_megatron_model

    _init(1, 1)
    try:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            load_megatron_model(path)
    finally:
        ps.destroy_model_parallel()
    return str(e.value)


def _copy_with_args(src: Path, dst: Path, **overrides) -> None:
    """A copy of a Megatron-LM checkpoint root whose saved args are changed.

    megatron-core 0.16 keeps the common state in `common.pt`; 0.19 keeps it inside the
    checkpoint's tensor files, where it cannot be edited in place, but reads a `common.pt` first
    (as for checkpoints that 0.16 wrote). So the changed state is written as `common.pt` on both.
    """
    from tiedlora_megatron import compat

    shutil.copytree(src, dst)
    iter_dir = dst / "iter_0000100"
    state = compat.read_common_state(iter_dir, lambda b: torch.load(b, weights_only=False))
    state["args"] = argparse.Namespace(**{**vars(state["args"]), **overrides})
    torch.save(state, iter_dir / compat.COMMON_STATE_FILE)


def test_errors_name_the_problem(pool, saved, tmp_path):
    from tiedlora_megatron.models import arch_from_megatron_lm_args

    root, _ = saved
    src = root / "megatron_lm"
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    (missing / "latest_checkpointed_iteration.txt").write_text("200\n")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    (corrupt / "latest_checkpointed_iteration.txt").write_text("iter_100?")
    _copy_with_args(src, tmp_path / "moe", num_experts=8)
    _copy_with_args(src, tmp_path / "yarn", position_embedding_type="yarn", qk_layernorm=True)

    messages = {
        name: pool.run(_error, str(tmp_path / name))[0]
        for name in ("missing", "corrupt", "moe", "yarn")
    }
    messages["nemo"] = pool.run(_error, str(root / "nemo"))[0]
    assert "names iter_0000200, which does not exist" in messages["missing"]
    assert "corrupt Megatron-LM tracker file" in messages["corrupt"]
    assert "'iter_100?'" in messages["corrupt"]
    assert "num_experts=8 (mixture of experts)" in messages["moe"]
    assert "position_embedding_type='yarn'" in messages["yarn"]
    assert "qk_layernorm=True" in messages["yarn"]
    assert "pass arch= explicitly" in messages["nemo"]

    # GPT-style defaults: LayerNorm, learned positions, biases, tied embeddings, and megatron's
    # fused bias-GeLU (the tanh approximation).
    gpt = arch_from_megatron_lm_args(
        dict(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            padded_vocab_size=256,
            vocab_size=250,
            max_position_embeddings=128,
            bias_gelu_fusion=True,
        )
    )
    assert gpt == dataclasses.replace(
        gpt,
        normalization="LayerNorm",
        position_embedding_type="learned_absolute",
        add_bias_linear=True,
        tie_embeddings=True,
        activation="gelu_tanh",
        ffn_hidden_size=128,
        num_query_groups=4,
        kv_channels=8,
        vocab_size=250,
        gated_linear_unit=False,
    )
