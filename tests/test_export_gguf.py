"""Export from the bases a job trains on besides HF directories: the quickstart's SmolLM2 GGUF
(`--base smollm2`) and a megatron checkpoint (with `hf_config`).

One rank loads SmolLM2 into megatron, gives a vBuA adapter on all four targets random non-zero
factors, saves it with the checkpoint API and exports it from the GGUF base as PEFT and as merged
HF; this process loads those exports with transformers / peft (PEFT onto transformers' own model
of the same GGUF) and compares logits. The CLI then exports the saved checkpoint again from
`--base smollm2`, and wrong bases are refused in one line. A tiny HF Llama saved as a megatron
checkpoint covers the megatron base.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import ProcessGroupPool
from tests.tiny_job import tiny_llama_config

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF model
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

PASSAGE = (
    "The sun is the star at the center of the Solar System. It is a nearly perfect sphere of "
    "hot plasma, heated by nuclear fusion in its core."
)
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
RANK = 2
#: fp32 logits: megatron vs transformers on the same weights (SmolLM2 logits reach ~30).
TOL = 1e-3
TINY_SEQ = [5, 17, 33, 2, 41, 8, 90, 11]


def _smollm2_path() -> Path:
    from tiedlora_megatron.models import default_smollm2_path

    try:
        return default_smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _randomize(adapters, scale_b: float = 0.05) -> None:
    """Non-zero A, B, u, v (TP = 1: every factor whole), so ΔW != 0 in every layer."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for chunk_adapters in adapters.adapters:
            for adapter in chunk_adapters.values():
                f = adapter.lowrank
                f.A.copy_(torch.randn(f.A.shape, generator=g) / f.A.shape[1] ** 0.5)
                f.B.copy_(scale_b * torch.randn(f.B.shape, generator=g))
                adapter.u.copy_(1 + 0.5 * torch.randn(adapter.u.shape, generator=g))
                adapter.v.copy_(1 + 0.5 * torch.randn(adapter.v.shape, generator=g))


def _export_smollm2(out: str) -> dict:
    """On the rank: SmolLM2 + random vBuA, its logits, a checkpoint, PEFT and merged exports."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.checkpoint import save_adapter_checkpoint
    from tiedlora_megatron.export import export_merged_hf, export_peft
    from tiedlora_megatron.models import (
        default_smollm2_path,
        forward_logits,
        load_smollm2,
        load_tokenizer,
    )

    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    try:
        chunks, info = load_smollm2()
        ids = load_tokenizer(default_smollm2_path()).encode(PASSAGE)
        vocab = info.arch.vocab_size
        base = forward_logits(chunks, [ids], vocab)[0]
        cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
        adapters = apply_tied_lora(chunks, cfg)
        _randomize(adapters)
        adapted = forward_logits(chunks, [ids], vocab)[0]
        save_adapter_checkpoint(Path(out) / "ckpt", chunks, adapters)
        export_peft(adapters, chunks, "smollm2", Path(out) / "peft")
        export_merged_hf(adapters, chunks, "smollm2", Path(out) / "merged")
    finally:
        ps.destroy_model_parallel()
    return {"ids": ids, "base": base, "adapted": adapted}


def _export_megatron(root: str) -> dict:
    """On the rank: a tiny HF Llama saved as a megatron checkpoint, adapted and exported from
    that checkpoint (with hf_config), and the refusals of a megatron base."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.export import ExportError, export_merged_hf, export_peft
    from tiedlora_megatron.export_base import resolve_base
    from tiedlora_megatron.models import forward_logits, load_hf_model, save_megatron_checkpoint

    hf, ckpt, out = (Path(root) / n for n in ("hf", "megatron", "out"))
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    errors = {}
    try:
        chunks, info = load_hf_model(hf)
        save_megatron_checkpoint(chunks, info.arch, ckpt)
        base = resolve_base(ckpt, hf_config=hf)
        chunks, _ = base.load()
        cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
        adapters = apply_tied_lora(chunks, cfg)
        _randomize(adapters, scale_b=0.2)
        adapted = forward_logits(chunks, [TINY_SEQ], info.arch.vocab_size)[0]
        export_peft(adapters, chunks, ckpt, out / "peft", hf_config=hf)
        export_merged_hf(adapters, chunks, base, out / "merged")
        for case, hf_config in (("no_hf_config", None), ("other_model", "smollm2")):
            try:
                resolve_base(ckpt, hf_config)
            except ExportError as e:
                errors[case] = str(e)
    finally:
        ps.destroy_model_parallel()
    return {"adapted": adapted, "errors": errors}


@pytest.fixture(scope="module")
def pool():
    _smollm2_path()
    with ProcessGroupPool(1) as p:
        yield p


@pytest.fixture(scope="module")
def smollm2(pool, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smollm2_export")
    [result] = pool.run(_export_smollm2, str(out))
    return out, result


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_peft_export_from_the_gguf_loads_onto_transformers_gguf_model(smollm2):
    out, r = smollm2
    path = _smollm2_path()
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(model, out / "peft")
    with model.disable_adapter():
        base_err = _diff(_logits(model, r["ids"]), r["base"])
    peft_err = _diff(_logits(model, r["ids"]), r["adapted"])
    effect = _diff(r["adapted"], r["base"])
    print(
        f"\nSmolLM2 GGUF, vBuA r={RANK} on {len(TARGETS)} targets: max |logit diff| vs megatron: "
        f"base {base_err:.2e}, PEFT {peft_err:.2e}; the adapter moves logits by {effect:.2f}"
    )
    assert effect > 100 * TOL, "the adapter should change the logits clearly"
    assert base_err < TOL and peft_err < TOL


def test_merged_export_from_the_gguf_loads_in_transformers(smollm2):
    from tiedlora_megatron.models import load_tokenizer

    out, r = smollm2
    merged = out / "merged"
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    err = _diff(_logits(model, r["ids"]), r["adapted"])
    print(f"\nSmolLM2 merged-HF export: max |logit diff| vs megatron {err:.2e}")
    assert err < TOL
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert config["torch_dtype"] == "float32"
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    ours = load_tokenizer(_smollm2_path())
    assert tok.encode(PASSAGE + " 1984", add_special_tokens=False) == ours.encode(PASSAGE + " 1984")
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == ours.hf.chat_template
    marker = json.loads((merged / ".tiedlora_export.json").read_text())
    assert marker["format"] == "merged-hf" and marker["base"] == str(_smollm2_path())


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tiedlora_megatron.cli", "export", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_cli_exports_from_smollm2(smollm2, tmp_path):
    out, _ = smollm2
    dst = tmp_path / "peft"
    done = _cli(
        *("--base", "smollm2", "--adapter", str(out / "ckpt")),
        *("--format", "peft", "--out", str(dst)),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {dst}"
    mine, api = (load_file(d / "adapter_model.safetensors") for d in (dst, out / "peft"))
    assert mine.keys() == api.keys() and all(torch.equal(mine[k], api[k]) for k in api)
    for name in ("adapter_config.json",):
        assert (dst / name).read_text() == (out / "peft" / name).read_text()


def test_a_wrong_base_is_refused_in_one_line(smollm2, tmp_path):
    from tiedlora_megatron.checkpoint import verify_adapter_checkpoint
    from tiedlora_megatron.export_base import check_adapter_base, resolve_base
    from tiedlora_megatron.export_names import ExportError

    out, _ = smollm2
    ckpt = out / "ckpt"
    done = _cli(
        *("--base", str(tmp_path / "missing"), "--adapter", str(ckpt)),
        *("--format", "merged-hf", "--out", str(tmp_path / "out")),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [x for x in done.stderr.splitlines() if x.startswith("tiedlora-megatron")]
    assert lines == [
        f"tiedlora-megatron: error: base model {tmp_path / 'missing'} does not exist; give "
        "'smollm2', a GGUF file, an HF model directory or a megatron checkpoint"
    ]
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    (tmp_path / "empty").mkdir()
    cases = {
        text: "is not a readable GGUF file",
        tmp_path / "empty": "is neither an HF model directory (no config.json) nor a megatron",
        ckpt: "is a Tied-LoRA adapter checkpoint, not a base model",
    }
    for base, expected in cases.items():
        with pytest.raises(ExportError, match="base model|adapter checkpoint") as e:
            resolve_base(base)
        assert expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ExportError, match="is for a megatron checkpoint base only"):
        resolve_base("smollm2", hf_config=tmp_path)
    meta, base = verify_adapter_checkpoint(ckpt), resolve_base("smollm2")
    check_adapter_base(meta, base, ckpt)
    meta["model_dims"]["hidden_size"] = 64
    with pytest.raises(ExportError, match="hidden_size: adapter 64, base 576"):
        check_adapter_base(meta, base, ckpt)


@pytest.fixture(scope="module")
def megatron_export(pool, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("megatron_base")
    torch.manual_seed(0)
    config = tiny_llama_config()
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    model.save_pretrained(root / "hf")
    [result] = pool.run(_export_megatron, str(root))
    return root, result


def test_export_from_a_megatron_checkpoint_with_hf_config(megatron_export):
    root, r = megatron_export
    hf, out = root / "hf", root / "out"
    auto = transformers.AutoModelForCausalLM
    base = auto.from_pretrained(hf)
    base_logits = _logits(base, TINY_SEQ)
    peft_model = peft.PeftModel.from_pretrained(base, out / "peft")
    assert _diff(r["adapted"], base_logits) > 0.1
    assert _diff(_logits(peft_model, TINY_SEQ), r["adapted"]) < 1e-4
    assert _diff(_logits(auto.from_pretrained(out / "merged"), TINY_SEQ), r["adapted"]) < 1e-4
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf)
    marker = json.loads((out / "merged" / ".tiedlora_export.json").read_text())
    assert marker["base"] == str(root / "megatron") and marker["hf_config"] == str(hf)
    errors = r["errors"]
    assert "is a megatron checkpoint, which names no HF architecture" in errors["no_hf_config"]
    assert "--hf-config" in errors["no_hf_config"]
    assert (
        "is not the model hf_config smollm2 describes: num_layers: checkpoint 2, HF config 30"
        in (errors["other_model"])
    )
