"""Merge / unmerge and HF export: a vBuA adapter on all four targets of small random HF Llama
(GQA) and GPT-2 models at TP 2 x PP 2, exported as a PEFT LoRA adapter and as a merged HF
checkpoint, gives transformers (+ peft) the logits of the megatron model with the adapter.

The ranks build the megatron models, give the adapters random non-zero factors, export, and
return their logits; this process loads the exports with transformers / peft and compares.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import ProcessGroupPool

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

SEQS = [[5, 17, 33, 2, 41, 8, 90, 11, 64, 3], [7, 21, 95, 40, 13, 6]]
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
RANK = 4
TOL = 1e-4
MODELS = ("llama_gqa", "gpt2")


def _hf_models() -> dict:
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4)
    return {
        "llama_gqa": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **common,
                max_position_embeddings=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            )
        ),
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=101, n_embd=64, n_layer=4, n_head=4, n_positions=64)
        ),
    }


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    for name, model in _hf_models().items():
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname or "ln_" in pname:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.15)
        model.save_pretrained(root / name)
        (root / name / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return str(root)


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(4) as p:
        yield p


def _randomize_adapters(adapters) -> None:
    """Non-zero factors, drawn in full per (kind, layer) and sliced to this rank's shard, so the
    adapter is the same at every layout (tied A, B: the same in every layer and chunk)."""
    for chunk_adapters in adapters.adapters:
        for adapter in chunk_adapters.values():
            lay, f = adapter.layout, adapter.lowrank
            kind = TARGETS.index(adapter.kind)
            g = torch.Generator().manual_seed(kind)
            a = 0.2 * torch.randn(RANK, lay.in_features, generator=g)
            b = 0.2 * torch.randn(lay.out_features, RANK, generator=g)
            g.manual_seed(100 + 10 * adapter.layer_number + kind)
            u = 1 + 0.5 * torch.randn(RANK, generator=g)
            v = 1 + 0.5 * torch.randn(lay.out_features, generator=g)
            with torch.no_grad():
                f.A.copy_(a[:, lay.local_in_index()])
                f.B.copy_(b[lay.local_out_index()])
                adapter.u.copy_(u)
                adapter.v.copy_(v[lay.local_out_index()])


def _last(logits: torch.Tensor | None) -> list[torch.Tensor] | None:
    """Per sequence, the logits of its real (not left-padding) positions."""
    if logits is None:
        return None
    return [logits[i, logits.shape[1] - len(s) :] for i, s in enumerate(SEQS)]


def _run(root: str, out: str) -> dict:
    """On every rank (TP 2 x PP 2): adapt, export, merge / unmerge, error cases."""
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.checkpoint import save_adapter_checkpoint
    from tiedlora_megatron.export import (
        ExportError,
        export_merged_hf,
        export_peft,
        merge_adapters,
        unmerge_adapters,
    )
    from tiedlora_megatron.inject import TiedLoRAAdapters
    from tiedlora_megatron.models import forward_logits, load_hf_model
    from tiedlora_megatron.models.hf import arch_from_hf_config, read_hf_config

    ps.initialize_model_parallel(2, 2)
    model_parallel_cuda_manual_seed(1234)
    result: dict = {}
    try:
        for name in MODELS:
            src, dst = Path(root) / name, Path(out) / name
            chunks, info = load_hf_model(src)
            vocab = info.arch.vocab_size
            base = _last(forward_logits(chunks, SEQS, vocab))
            cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
            adapters = apply_tied_lora(chunks, cfg)
            _randomize_adapters(adapters)
            adapted = _last(forward_logits(chunks, SEQS, vocab))

            export_peft(adapters, chunks, src, dst / "peft")
            export_merged_hf(adapters, chunks, src, dst / "merged")
            save_adapter_checkpoint(dst / "ckpt", chunks, adapters)

            weights = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
            merge_adapters(adapters)
            merged = _last(forward_logits(chunks, SEQS, vocab))
            with pytest.raises(RuntimeError, match="already merged"):
                merge_adapters(adapters)
            unmerge_adapters(adapters)
            unmerged = _last(forward_logits(chunks, SEQS, vocab))
            rel = max(
                ((p - weights[n]).norm() / weights[n].norm()).item()
                for n, p in chunks[0].named_parameters()
                if n in weights and weights[n].dim() == 2
            )
            result[name] = dict(
                base=base, adapted=adapted, merged=merged, unmerged=unmerged, unmerge_rel=rel
            )

            errors = {}
            with pytest.raises(FileExistsError) as e:
                export_peft(adapters, chunks, src, dst / "peft")
            errors["exists"] = str(e.value)
            export_peft(adapters, chunks, src, dst / "peft", overwrite=True)
            other = arch_from_hf_config(read_hf_config(Path(root) / "gpt2"))
            wider = dataclasses.replace(info.arch, ffn_hidden_size=128)
            with pytest.raises(ExportError) as e:
                export_peft(adapters, chunks, other if name != "gpt2" else wider, dst / "x")
            errors["base"] = str(e.value)
            with pytest.raises(ExportError) as e:
                export_peft(
                    adapters, chunks, dataclasses.replace(info.arch, family="falcon"), dst / "y"
                )
            errors["family"] = str(e.value)
            # A target outside the decoder layers (on one pipeline stage only): every rank raises.
            moved = [dict(a) for a in adapters.adapters]
            if ps.is_pipeline_first_stage():
                key = next(iter(moved[0]))
                moved[0]["mtp." + key.split(".", 3)[3]] = moved[0].pop(key)
            odd = TiedLoRAAdapters(cfg, chunks, moved, adapters.banks)
            with pytest.raises(ExportError) as e:
                export_merged_hf(odd, chunks, src, dst / "x")
            errors["target"] = str(e.value)
            result[name]["errors"] = errors
    finally:
        ps.destroy_model_parallel()
    return result


def _hf_logits(model: torch.nn.Module) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0] for s in SEQS]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def exported(pool, hf_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    results = pool.run(_run, hf_dir, str(out))
    return out, results


def _on_last_stage(results: list[dict], name: str) -> list[dict]:
    rows = [r[name] for r in results if r[name]["adapted"] is not None]
    assert rows, f"{name}: no rank returned logits"
    return rows


@pytest.mark.parametrize("name", MODELS)
def test_peft_and_merged_exports_match_megatron(exported, hf_dir, name):
    out, results = exported
    rows = _on_last_stage(results, name)
    ref = rows[0]["adapted"]
    assert _max_diff(ref, rows[0]["base"]) > 0.1, "the adapter should change the logits"
    auto = transformers.AutoModelForCausalLM
    peft_model = peft.PeftModel.from_pretrained(
        auto.from_pretrained(Path(hf_dir) / name), out / name / "peft"
    )
    peft_err = _max_diff(_hf_logits(peft_model), ref)
    merged_err = _max_diff(_hf_logits(auto.from_pretrained(out / name / "merged")), ref)
    peft_file = out / name / "peft" / "adapter_model.safetensors"
    peft_params = sum(t.numel() for t in load_file(peft_file).values())
    meta = json.loads((out / name / "ckpt" / "tiedlora.json").read_text())
    print(
        f"\n{name}: max |logit diff| vs megatron TP2xPP2: peft {peft_err:.2e}, merged "
        f"{merged_err:.2e}; PEFT adapter {peft_params:,} params / {peft_file.stat().st_size:,} B "
        f"vs tied checkpoint {meta['trainable_parameters']:,} params / "
        f"{_dir_bytes(out / name / 'ckpt'):,} B (with dist-checkpoint metadata)"
    )
    assert peft_err < TOL and merged_err < TOL
    assert (out / name / "merged" / "tokenizer_config.json").is_file()
    config = json.loads((out / name / "peft" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK
    if name == "gpt2":
        assert config["fan_in_fan_out"] and config["target_modules"] == ["c_attn", "c_fc", "c_proj"]


@pytest.mark.parametrize("name", MODELS)
def test_merge_then_unmerge_restores_the_base(exported, name):
    _, results = exported
    assert max(r[name]["unmerge_rel"] for r in results) < 1e-6
    for r in _on_last_stage(results, name):
        assert _max_diff(r["merged"], r["adapted"]) < TOL
        assert _max_diff(r["unmerged"], r["adapted"]) < TOL


def test_errors_name_the_problem(exported):
    _, results = exported
    for r in results:
        llama, gpt2 = r["llama_gqa"]["errors"], r["gpt2"]["errors"]
        assert "exists; pass overwrite=True" in llama["exists"]
        assert "does not match the HF base" in llama["base"] and "hidden_size" in llama["base"]
        assert "ffn_hidden_size: model 256, HF config 128" in gpt2["base"]
        assert "model family 'falcon' has no HF equivalent" in llama["family"]
        assert "mtp." in llama["target"] and "has no HF llama equivalent" in llama["target"]


def test_cli_exports_the_checkpoint_at_tp1(exported, hf_dir, tmp_path):
    out, results = exported
    cases = [("llama_gqa", "peft"), ("gpt2", "merged-hf")]
    for name, fmt in cases:
        dst = tmp_path / name
        cmd = [sys.executable, "-m", "tiedlora_megatron.cli", "export", "--base"]
        cmd += [str(Path(hf_dir) / name), "--adapter", str(out / name / "ckpt")]
        cmd += ["--format", fmt, "--out", str(dst)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        base = transformers.AutoModelForCausalLM.from_pretrained(
            Path(hf_dir) / name if fmt == "peft" else dst
        )
        model = peft.PeftModel.from_pretrained(base, dst) if fmt == "peft" else base
        ref = _on_last_stage(results, name)[0]["adapted"]
        assert _max_diff(_hf_logits(model), ref) < TOL
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "exists; pass overwrite=True" in again.stderr
