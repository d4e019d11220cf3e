"""HF checkpoints -> megatron-core: logits parity with transformers at TP 1/2 x PP 1/2 (and
virtual PP), KV-cached batched generation, dist-checkpoint resharding, and clear errors.

Small random models are saved with transformers into a temporary directory; transformers'
logits and greedy continuations are computed once in this process and compared on the ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import ProcessGroupPool

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SEQS = [[5, 17, 33, 2, 41, 8, 90, 11, 64, 3], [7, 21, 95, 40, 13, 6]]  # ragged: left padding
PROMPTS = [[5, 17, 33, 2, 41], [7, 21, 95], [60, 1, 44, 9, 12, 70, 18]]
NEW_TOKENS = 6
TOL = 2e-5


def _hf_models() -> dict:
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4)
    common["max_position_embeddings"] = 64
    return {
        # GQA with 2 kv groups, untied, non-default rope base.
        "llama_gqa": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **common,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=5000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
            )
        ),
        # One kv group: at TP 2 the fused QKV rows of that group are split between ranks.
        "llama_mqa_tied": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **common,
                num_attention_heads=4,
                num_key_value_heads=1,
                tie_word_embeddings=True,
            )
        ),
        "mistral": transformers.MistralForCausalLM(
            transformers.MistralConfig(
                **common,
                num_attention_heads=4,
                num_key_value_heads=2,
                sliding_window=32,
                tie_word_embeddings=False,
            )
        ),
        "qwen2_bias": transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                **common,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            )
        ),
        # query / key norms, explicit head size
        "qwen3": transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(
                **common,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                tie_word_embeddings=False,
            )
        ),
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=101, n_embd=64, n_layer=4, n_head=4, n_positions=64)
        ),
    }


def _randomize(model: torch.nn.Module) -> None:
    """Larger weights than HF's init so that logits (and greedy choices) are well separated."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hf")
    refs = {}
    for name, model in _hf_models().items():
        _randomize(model)
        model.eval()
        model.save_pretrained(root / name)
        with torch.no_grad():
            logits = [model(torch.tensor([s])).logits[0] for s in SEQS]
            greedy = [
                model.generate(
                    torch.tensor([p]),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )[0, len(p) :].tolist()
                for p in PROMPTS
            ]
        refs[name] = {"logits": logits, "greedy": greedy}
    torch.save(refs, root / "refs.pt")
    return str(root)


def _llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to q / k rows (RoPE halves -> pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> str:
    """A tiny Llama written as llama.cpp would (Q8_0 matrices, permuted q / k), with
    transformers' logits for the same (quantised) weights."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    model = _hf_models()["llama_gqa"]
    _randomize(model)
    cfg = model.config
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.removeprefix("model.").removesuffix(".weight")
            if key.startswith("layers."):
                _, i, part = key.split(".", 2)
                gg = f"blk.{i}.{parts[part]}.weight"
            else:
                gg = f"{names.get(key, 'output')}.weight"
            if p.dim() == 1:
                w.add_tensor(gg, p.numpy())
                continue
            packed = quantize(p.numpy(), q8)
            p.copy_(torch.from_numpy(dequantize(packed, q8)))  # the reference sees the rounding
            if gg.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_attention_heads if "attn_q" in gg else cfg.num_key_value_heads
                packed = quantize(_llama_cpp_permute(p, heads).numpy(), q8)
            w.add_tensor(gg, packed, raw_shape=packed.shape, raw_dtype=q8)
        refs = [model(torch.tensor([s])).logits[0] for s in SEQS]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    torch.save(refs, path.with_suffix(".pt"))
    return str(path)


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(2) as p:
        yield p


@pytest.fixture(scope="module")
def pool4():
    with ProcessGroupPool(4) as p:
        yield p


def _init(tp: int, pp: int, vp: int | None = None) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vp)
    model_parallel_cuda_manual_seed(1234)


def _logit_errors(chunks, vocab: int, refs: dict) -> float | None:
    from tiedlora_megatron.models import forward_logits

    logits = forward_logits(chunks, SEQS, vocab)
    if logits is None:
        return None
    width = logits.shape[1]
    return max(
        (logits[i, width - len(s) :] - ref).abs().max().item()
        for i, (s, ref) in enumerate(zip(SEQS, refs["logits"], strict=True))
    )


def _parity(root: str, tp: int, pp: int, vp: int | None, sp: bool = False) -> dict:
    """Max |logit - transformers| per model on last-stage ranks; greedy tokens on every rank
    (`sp`: sequence parallel, where batches are padded to a multiple of TP and generation
    recomputes without a KV cache)."""
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import generate, load_hf_model

    refs = torch.load(Path(root) / "refs.pt")
    out = {}
    _init(tp, pp, vp)
    try:
        for name, ref in refs.items():
            chunks, info = load_hf_model(
                Path(root) / name, config_overrides={"sequence_parallel": sp}
            )
            vocab = info.arch.vocab_size
            greedy = generate(chunks, PROMPTS, vocab_size=vocab, max_new_tokens=NEW_TOKENS)
            out[name] = {"err": _logit_errors(chunks, vocab, ref), "greedy": greedy}
    finally:
        ps.destroy_model_parallel()
    return out


def _check_parity(results: list[dict], root: str) -> None:
    refs = torch.load(Path(root) / "refs.pt")
    for name, ref in refs.items():
        errors = [r[name]["err"] for r in results if r[name]["err"] is not None]
        assert errors, f"{name}: no rank returned logits"
        assert max(errors) < TOL, f"{name}: logits differ from transformers by {max(errors)}"
        for r in results:
            assert r[name]["greedy"] == ref["greedy"], name


@pytest.mark.parametrize("tp,pp,vp", [(1, 1, None), (2, 1, None), (1, 2, None), (1, 2, 2)])
def test_logits_and_greedy_match_transformers(pool, hf_dir, tp, pp, vp):
    _check_parity(pool.run(_parity, hf_dir, tp, pp, vp), hf_dir)


def test_logits_and_greedy_match_transformers_tp2_pp2_sp(pool4, hf_dir):
    _check_parity(pool4.run(_parity, hf_dir, 2, 2, None, True), hf_dir)


def _load_with_empty_biases(root: str) -> dict[str, bool]:
    """Load llama_gqa (no linear biases) at TP 2 twice: as megatron's local layers keep a missing
    bias (None), and as Transformer Engine's do (an empty tensor). Per parameter: equal?"""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from tiedlora_megatron.models import build_model, load_hf_model
    from tiedlora_megatron.models.hf import (
        SafetensorsSource,
        arch_from_hf_config,
        model_dir,
        read_hf_config,
    )
    from tiedlora_megatron.models.weights import load_weights

    path = model_dir(Path(root) / "llama_gqa")
    _init(2, 1)
    try:
        (want,), _ = load_hf_model(path)
        arch = arch_from_hf_config(read_hf_config(path))
        (got,) = build_model(arch)
        linears = [
            m for m in got.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
        ]
        for m in linears:
            assert m.bias is None
            m.bias = torch.nn.Parameter(torch.empty(0))
        load_weights([got], arch, SafetensorsSource(path, arch), str(path))
        wanted = dict(want.named_parameters())
        return {
            n: bool(torch.equal(p, wanted[n])) for n, p in got.named_parameters() if p.numel() > 0
        } | {"empty biases": len(linears) > 0}
    finally:
        ps.destroy_model_parallel()


def test_empty_te_style_biases_are_no_biases(pool, hf_dir):
    """TE keeps an empty tensor for a layer built without bias: the loader must neither ask the
    checkpoint for such a bias nor count it as unfilled."""
    for result in pool.run(_load_with_empty_biases, hf_dir):
        assert result and all(result.values()), [n for n, ok in result.items() if not ok]


def _sampling(root: str) -> tuple[list, list, list]:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import generate, load_hf_model

    _init(2, 1)
    try:
        chunks, info = load_hf_model(Path(root) / "llama_gqa")
        kw = dict(vocab_size=info.arch.vocab_size, max_new_tokens=NEW_TOKENS)
        with pytest.raises(ValueError, match="exceed the model's 64 positions"):
            generate(chunks, PROMPTS, vocab_size=info.arch.vocab_size, max_new_tokens=60)
        a = generate(chunks, PROMPTS, temperature=1.0, top_p=0.9, seed=3, **kw)
        b = generate(chunks, PROMPTS, temperature=1.0, top_p=0.9, seed=3, **kw)
        top1 = generate(chunks, PROMPTS, temperature=0.7, top_k=1, seed=5, **kw)
        # Stop tokens: each continuation ends at its first eos and later rows keep going.
        eos = a[0][1]
        stopped = generate(
            chunks, PROMPTS, eos_token_ids=[eos], temperature=1.0, top_p=0.9, seed=3, **kw
        )
    finally:
        ps.destroy_model_parallel()
    assert a == b
    return a, top1, stopped


def test_sampling_is_seeded_identical_across_tp_and_stops_at_eos(pool, hf_dir):
    (a0, top1, stopped), (a1, _, _) = pool.run(_sampling, hf_dir)
    assert a0 == a1, "TP ranks sampled different tokens"
    refs = torch.load(Path(hf_dir) / "refs.pt")
    assert top1 == refs["llama_gqa"]["greedy"]
    eos = a0[0][1]
    for full, cut in zip(a0, stopped, strict=True):
        assert cut == full[: full.index(eos) + 1] if eos in full else cut == full


def _gguf_parity(path: str, tp: int) -> float | None:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import load_gguf_model

    refs = torch.load(Path(path).with_suffix(".pt"))
    _init(tp, 1)
    try:
        chunks, info = load_gguf_model(path)
        return _logit_errors(chunks, info.arch.vocab_size, {"logits": refs})
    finally:
        ps.destroy_model_parallel()


def test_quantised_gguf_llama_matches_transformers_at_tp2(pool, gguf_file):
    errors = pool.run(_gguf_parity, gguf_file, 2)
    assert max(errors) < TOL


def _reshard(root: str, ckpt: str, save: bool, tp: int, pp: int) -> float | None:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import (
        load_hf_model,
        load_megatron_model,
        save_megatron_checkpoint,
    )

    refs = torch.load(Path(root) / "refs.pt")
    _init(tp, pp)
    try:
        if save:
            chunks, info = load_hf_model(Path(root) / "gpt2")
            save_megatron_checkpoint(chunks, info.arch, ckpt)
            return None
        chunks, info = load_megatron_model(ckpt)
        assert info.format == "megatron" and info.arch.family == "gpt2"
        return _logit_errors(chunks, info.arch.vocab_size, refs["gpt2"])
    finally:
        ps.destroy_model_parallel()


def test_dist_checkpoint_roundtrips_at_another_tp(pool, hf_dir, tmp_path):
    # GPT-2's vocabulary of 101 is padded at TP 2; the checkpoint keeps that padding.
    ckpt = str(tmp_path / "ckpt")
    pool.run(_reshard, hf_dir, ckpt, True, 2, 1)
    errors = [e for e in pool.run(_reshard, hf_dir, ckpt, False, 1, 2) if e is not None]
    assert errors and max(errors) < TOL


def _errors(root: str, bad: str) -> list[str]:
    from megatron.core import parallel_state as ps

    from tiedlora_megatron.models import load_hf_model, load_megatron_model

    messages = []
    _init(2, 1)
    try:
        for path, loader in [
            (Path(bad) / "three_heads", load_hf_model),
            (Path(bad) / "mismatched", load_hf_model),
            (Path(root) / "gpt2", load_megatron_model),
        ]:
            with pytest.raises((ValueError, FileNotFoundError)) as e:
                loader(path)
            messages.append(str(e.value))
    finally:
        ps.destroy_model_parallel()
    return messages


def test_errors_name_the_problem(pool, hf_dir, tmp_path):
    from tiedlora_megatron.models import arch_from_hf_config, load_hf_model

    root = Path(hf_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="unsupported architecture: model_type='bert'"):
        arch_from_hf_config({"model_type": "bert", "architectures": ["BertModel"]})
    llama = json.loads((root / "llama_gqa" / "config.json").read_text())
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        arch_from_hf_config({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="attention_bias=True with mlp_bias=False"):
        arch_from_hf_config({**llama, "attention_bias": True})

    bad = tmp_path / "bad"
    three = bad / "three_heads"
    three.mkdir(parents=True)
    (three / "config.json").write_text(
        json.dumps({**llama, "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 16})
    )
    (three / "model.safetensors").symlink_to(root / "llama_gqa" / "model.safetensors")
    mismatched = bad / "mismatched"
    mismatched.mkdir()
    (mismatched / "config.json").write_text(json.dumps({**llama, "intermediate_size": 128}))
    (mismatched / "model.safetensors").symlink_to(root / "llama_gqa" / "model.safetensors")

    heads, shape, not_ckpt = pool.run(_errors, hf_dir, str(bad))[0]
    assert "tensor_model_parallel_size=2" in heads and "num_attention_heads=3" in heads
    assert "usable TP sizes: [1, 3]" in heads
    assert "'layers.0.gate' has shape (96, 64) but the config implies (128, 64)" in shape
    assert "not a megatron dist checkpoint" in not_ckpt

    no_weights = tmp_path / "bin_only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(llama))
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    from tiedlora_megatron.models.hf import SafetensorsSource, read_hf_config

    arch = arch_from_hf_config(read_hf_config(no_weights))
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights.*pytorch_model.bin"):
        SafetensorsSource(no_weights, arch)
