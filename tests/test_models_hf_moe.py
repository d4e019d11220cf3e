"""HF MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE) -> megatron-core (models/moe.py): logits equal
transformers' at TP 1/2 (sequence parallel) x EP 1/2, and Tied-LoRA on the loaded experts.

Small random models are saved with transformers; their logits are computed once in this process
and compared on the ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import ProcessGroupPool

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SEQS = [[5, 17, 33, 2, 41, 8, 90, 11, 64, 3], [7, 21, 95, 40, 13, 6]]
TOL = 2e-5


def _hf_models() -> dict:
    common = dict(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return {
        "mixtral": transformers.MixtralForCausalLM(
            transformers.MixtralConfig(
                **common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2
            )
        ),
        # shared expert with its sigmoid gate; top-k probabilities not renormalised
        "qwen2_moe": transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(
                **common,
                intermediate_size=96,
                moe_intermediate_size=48,
                num_experts=4,
                num_experts_per_tok=2,
                shared_expert_intermediate_size=80,
                norm_topk_prob=False,
            )  # fmt: skip
        ),
        # query / key norms; top-k renormalised, no shared expert
        "qwen3_moe": transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                **common,
                intermediate_size=96,
                moe_intermediate_size=48,
                num_experts=4,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                head_dim=16,
            )  # fmt: skip
        ),
        "qwen2_moe_normed": transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(
                **common,
                intermediate_size=96,
                moe_intermediate_size=48,
                num_experts=4,
                num_experts_per_tok=2,
                shared_expert_intermediate_size=80,
                norm_topk_prob=True,
            )  # fmt: skip
        ),
    }


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hf_moe")
    refs = {}
    for name, model in _hf_models().items():
        torch.manual_seed(0)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.15)
        model.eval()
        model.save_pretrained(root / name)
        with torch.no_grad():
            refs[name] = [model(torch.tensor([s])).logits[0] for s in SEQS]
    torch.save(refs, root / "refs.pt")
    return str(root)


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(4) as p:
        yield p


def _init(tp: int, ep: int, etp: int = 1) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(
        tp, 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp
    )
    model_parallel_cuda_manual_seed(1234)


def _parity(root: str, tp: int, ep: int, etp: int) -> dict[str, float | None]:
    """Max |logit - transformers| per model on this rank."""
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import forward_logits, load_hf_model

    refs = torch.load(Path(root) / "refs.pt")
    out = {}
    _init(tp, ep, etp)
    try:
        for name, ref in refs.items():
            chunks, info = load_hf_model(
                Path(root) / name, config_overrides={"sequence_parallel": tp > 1}
            )
            logits = forward_logits(chunks, SEQS, info.arch.vocab_size)
            width = logits.shape[1]
            out[name] = max(
                (logits[i, width - len(s) :] - r).abs().max().item()
                for i, (s, r) in enumerate(zip(SEQS, ref, strict=True))
            )
    finally:
        ps.destroy_model_parallel()
    return out


@pytest.mark.parametrize(("tp", "ep", "etp"), [(1, 1, 1), (2, 2, 1), (2, 2, 2)])
def test_logits_match_transformers(pool, hf_dir, tp, ep, etp):
    results = pool.run(_parity, hf_dir, tp, ep, etp)
    for name in results[0]:
        worst = max(r[name] for r in results)
        assert worst < TOL, f"{name} at TP {tp} x EP {ep} x ETP {etp}: logits differ by {worst}"


def _no_sp_error(root: str) -> str:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import load_hf_model

    _init(2, 1)
    try:
        with pytest.raises(ValueError) as e:
            load_hf_model(Path(root) / "mixtral")
        return str(e.value)
    finally:
        ps.destroy_model_parallel()


def test_layouts_megatron_cannot_run_are_refused_by_name(pool, hf_dir):
    import dataclasses

    from tiedlora_megatron.models.hf import arch_from_hf_config, read_hf_config
    from tiedlora_megatron.models.moe import moe_parallel_problems

    assert "set sequence_parallel=True" in pool.run(_no_sp_error, hf_dir)[0]
    arch = arch_from_hf_config(read_hf_config(Path(hf_dir) / "qwen2_moe"))
    assert (arch.num_moe_experts, arch.moe_shared_expert_gate, arch.moe_router_pre_softmax) == (
        4, True, True,
    )  # fmt: skip
    six = dataclasses.replace(arch, num_moe_experts=6)
    assert moe_parallel_problems(six, 1, 4, False) == [
        "6 experts cannot be split over expert_model_parallel_size=4"
    ]
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        arch_from_hf_config({**read_hf_config(Path(hf_dir) / "qwen2_moe"), "mlp_only_layers": [0]})


# -- Tied-LoRA on a loaded MoE model, exported as per-expert PEFT LoRA ----------------------------

MOE_TARGETS = {
    "mixtral": ["linear_qkv", "experts.linear_fc1", "experts.linear_fc2"],
    "qwen2_moe": [
        "linear_qkv", "experts.linear_fc1", "experts.linear_fc2",
        "shared_experts.linear_fc1", "shared_experts.linear_fc2",
    ],
    "qwen3_moe": ["linear_qkv", "linear_proj", "experts.linear_fc1", "experts.linear_fc2"],
}  # fmt: skip


def _adapted_and_exported(
    root: str, out: str, name: str, preset: str, tp: int, ep: int, etp: int, merged=False
):
    """Logits of the loaded model with random adapters (on ranks that have them) and the
    adapters exported to `out` as PEFT LoRA (`merged`: as the HF model with ΔW folded in)."""
    from megatron.core import parallel_state as ps

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.export import export_merged_hf, export_peft
    from tiedlora_megatron.models import forward_logits, load_hf_model

    _init(tp, ep, etp)
    try:
        chunks, info = load_hf_model(
            Path(root) / name, config_overrides={"sequence_parallel": tp > 1}
        )
        cfg = TiedLoRAConfig.preset(preset, rank=4, alpha=8, target_modules=MOE_TARGETS[name])
        adapters = apply_tied_lora(chunks, cfg)
        g = torch.Generator().manual_seed(3)
        state = {
            k: torch.randn(v.shape, generator=g) * 0.2 + (k[-1] in "uv")
            for k, v in adapters.full_state_dict().items()
        }
        adapters.load_full_state_dict(state)
        logits = forward_logits(chunks, SEQS, info.arch.vocab_size)
        if merged:
            export_merged_hf(adapters, chunks, Path(root) / name, out)
        else:
            export_peft(adapters, chunks, Path(root) / name, out)
        return logits
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize(
    ("name", "preset", "tp", "ep", "etp"),
    [("mixtral", "vBuA", 2, 2, 2), ("qwen2_moe", "lora", 2, 2, 1), ("qwen3_moe", "vBuA", 1, 2, 1)],
)
def test_peft_export_loads_in_peft_with_the_same_logits(
    pool, hf_dir, tmp_path, name, preset, tp, ep, etp
):
    peft = pytest.importorskip("peft")
    out = tmp_path / "peft"
    logits = pool.run(_adapted_and_exported, hf_dir, str(out), name, preset, tp, ep, etp)[0]
    base = transformers.AutoModelForCausalLM.from_pretrained(Path(hf_dir) / name)
    from safetensors.torch import load_file

    # per layer: q, k, v + every expert's gate, up, down (+ the shared expert's), A and B each
    modules = 3 + 4 * 3 + {"qwen2_moe": 3, "qwen3_moe": 1}.get(name, 0)
    assert len(load_file(out / "adapter_model.safetensors")) == 2 * 2 * modules
    model = peft.PeftModel.from_pretrained(base, out).eval()
    refs = torch.load(Path(hf_dir) / "refs.pt")[name]
    width = logits.shape[1]
    with torch.no_grad():
        for i, (seq, ref) in enumerate(zip(SEQS, refs, strict=True)):
            got = model(torch.tensor([seq])).logits[0]
            mine = logits[i, width - len(seq) :]
            assert (mine - ref).abs().max() > 0.1  # the adapters move the logits
            torch.testing.assert_close(got, mine, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "tp", "ep", "etp"), [("qwen2_moe", 2, 2, 1), ("qwen3_moe", 2, 2, 2)]
)
def test_merged_export_loads_in_transformers_with_the_same_logits(
    pool, hf_dir, tmp_path, name, tp, ep, etp
):
    out = tmp_path / "merged"
    logits = pool.run(_adapted_and_exported, hf_dir, str(out), name, "vBuA", tp, ep, etp, True)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    refs = torch.load(Path(hf_dir) / "refs.pt")[name]
    width = logits.shape[1]
    with torch.no_grad():
        for i, (seq, ref) in enumerate(zip(SEQS, refs, strict=True)):
            mine = logits[i, width - len(seq) :]
            assert (mine - ref).abs().max() > 0.1  # the adapters move the logits
            torch.testing.assert_close(
                model(torch.tensor([seq])).logits[0], mine, rtol=1e-4, atol=1e-4
            )
