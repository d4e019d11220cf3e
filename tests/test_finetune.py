"""The fine-tuning job, run as users run it: `torchrun -m tiedlora_megatron.finetune train`.

A tiny random Llama in HF format with SmolLM2's tokenizer and a JSONL task (tests/tiny_job.py)
trains at TP=2 (SP) and at PP=2 on 2 ranks, a tiny random Mixtral at EP=2. Each layout runs once
uninterrupted and once stopped half-way (`train.exit_interval`) and resumed by rerunning the same
command; the resumed run's per-step losses and final adapter weights must equal the uninterrupted run's.
Config mistakes must fail before any process group exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_job import make_tiny_job

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "tiny_gpt.yaml"
MOE_CONFIG = ROOT / "examples" / "configs" / "tiny_moe.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    overrides = make_tiny_job(tmp_path_factory.mktemp("tiny"))
    return [f"{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    overrides = make_tiny_job(tmp_path_factory.mktemp("tiny_moe"), moe=True)
    return [f"{k}={v}" for k, v in overrides.items()]


def _run(
    nproc: int, overrides: list[str], command: str = "train", config: Path = CONFIG
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "tiedlora_megatron.finetune", command,
        "--config", str(config), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _losses(output_dir: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl (a resumed run appends to the same file)."""
    out = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def _adapter_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter checkpoint, read without process groups."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(flat))
    state = torch.load(flat, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize(
    ("job", "nproc", "layout"),
    [
        ("dense", 2, ["parallel.tp=2", "parallel.sp=true"]),
        ("dense", 2, ["parallel.pp=2"]),  # PP x DP: tests/test_parallel_training.py
        # TP x SP x EP exactness: tests/test_moe_adapters.py; here the job's EP plumbing
        ("moe", 2, ["parallel.ep=2"]),
    ],
    ids=["tp2_sp", "pp2", "moe_ep2"],
)
def test_resume_matches_uninterrupted(
    request: pytest.FixtureRequest, tmp_path: Path, job: str, nproc: int, layout: list[str]
) -> None:
    tiny = request.getfixturevalue("tiny" if job == "dense" else "tiny_moe")
    config = CONFIG if job == "dense" else MOE_CONFIG
    common = [*tiny, *layout, "train.steps=4", "eval.num_examples=-1", "eval.val_examples=8"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(nproc, [*common, f"train.output_dir={whole}"], config=config)
    first = _run(
        nproc, [*common, f"train.output_dir={parts}", "train.exit_interval=2"], config=config
    )
    assert "exit_interval reached" in first.stdout
    assert not (parts / "summary.json").exists()
    second = _run(
        nproc, [*common, f"train.output_dir={parts}", "train.exit_interval=2"], config=config
    )
    assert "resumed from" in second.stdout and "step_0000002" in second.stdout

    expected = _losses(whole)
    assert sorted(expected) == [1, 2, 3, 4]
    assert _losses(parts) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert expected[4] < expected[1]  # the adapters learn

    final = "checkpoints/step_0000004"
    a, b = _adapter_tensors(whole / final), _adapter_tensors(parts / final)
    assert sorted(a) == sorted(b) and any("tied_adapter" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)

    summary = json.loads((whole / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == nproc
    assert 0 < summary["tuned"]["val_loss"] < 20

    # The eval command on one rank (TP=1, PP=1, EP=1): the checkpoint reshards, and the same
    # validation examples give the job's own final validation loss.
    evaluated = tmp_path / "eval"
    one = [*tiny, "parallel.ep=1", "eval.num_examples=-1", "eval.val_examples=8",
           f"train.output_dir={evaluated}"]  # fmt: skip
    if layout == ["parallel.pp=2"]:  # resharding to one rank: tp2_sp's and moe_ep2's concern
        return
    _run(1, [*one, "--adapter", str(whole / final)], command="eval", config=config)
    result = json.loads((evaluated / "eval_step_0000004.json").read_text())
    assert result["val_loss"] == pytest.approx(summary["tuned"]["val_loss"], rel=1e-5)
    if layout != ["parallel.tp=2", "parallel.sp=true"]:  # the base model's evaluation: once
        return
    _run(1, one, command="eval", config=config)
    base = json.loads((evaluated / "eval_base.json").read_text())
    assert base["val_loss"] != pytest.approx(result["val_loss"], rel=1e-4)


def _main_fails(capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    import torch.distributed as dist

    from tiedlora_megatron.finetune.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stpes=3", "unknown config key train.'stpes' (did you mean 'steps'?)"),
        ("adapter.preset=vBuAA", "unknown preset 'vBuAA'"),
        ("parallel.tp=3", "cannot be split at tensor_model_parallel_size=3"),
        (
            "data.train=/nonexistent/train.jsonl",
            "data.train file /nonexistent/train.jsonl does not exist",
        ),
        ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
        ("precision.fp8=hybrid", "precision.fp8 needs model.spec=te"),
        ("train.global_batch=3", "must be a multiple of train.micro_batch=2"),
    ],
)
def test_config_errors_before_process_groups(
    tiny: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    override: str, message: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "3" if override == "parallel.tp=3" else "1")
    _main_fails(capsys, ["train", "--config", str(CONFIG), *tiny, override], message)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.ep=3"], 2, "parallel.ep x parallel.etp = 3 x 1 must divide the tp x data"),
        (["parallel.etp=2"], 2, "parallel.etp=2: expert tensor parallelism must be 1 or parallel"),
        (["parallel.tp=2", "parallel.sp=true", "parallel.etp=2"], 2, "= 2 x 2 must divide"),
        (["parallel.tp=2"], 2, "parallel.sp=true"),
        (["adapter.target_modules=[linear_fc1]"], 2, "its MLP target is experts.linear_fc1"),
        (["adapter.preset=lora", "adapter.tie_experts=true"], 2, "tie_experts=True needs tied"),
        (["model.spec=te"], 2, "MoE model is built on the local spec only"),
    ],
)
def test_moe_config_errors_before_process_groups(
    tiny_moe: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    overrides: list[str], world: int, message: str,
) -> None:  # fmt: skip
    from tiedlora_megatron.finetune import checks

    monkeypatch.setattr(checks, "te_available", lambda: True)  # past the TE check, to ours
    monkeypatch.setenv("WORLD_SIZE", str(world))
    _main_fails(capsys, ["train", "--config", str(MOE_CONFIG), *tiny_moe, *overrides], message)


def test_missing_config_file(capsys: pytest.CaptureFixture) -> None:
    _main_fails(
        capsys, ["train", "--config", "/nonexistent.yaml"], "/nonexistent.yaml does not exist"
    )


def test_show_prints_resolved_config(tiny: list[str], capsys: pytest.CaptureFixture) -> None:
    import yaml

    from tiedlora_megatron.finetune.cli import main

    assert main(["show", "--config", str(CONFIG), "adapter.target_modules=[linear_qkv]"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["adapter"]["target_modules"] == ["linear_qkv"]
    assert shown["train"]["micro_batch"] == 2  # from the YAML
    assert shown["optim"]["adam_beta2"] == 0.999  # a default


def test_te_spec_from_a_megatron_checkpoint_is_refused(
    tiny: list[str], capsys: pytest.CaptureFixture
) -> None:
    args = ["model.source=megatron", "model.path=/nonexistent", "model.spec=te"]
    _main_fails(
        capsys, ["train", "--config", str(CONFIG), *tiny, *args], "loads onto model.spec=local"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is not None, reason="TE is installed"
)
def test_te_spec_without_te_is_refused(tiny: list[str], capsys: pytest.CaptureFixture) -> None:
    _main_fails(
        capsys,
        ["train", "--config", str(CONFIG), *tiny, "model.spec=te"],
        "model.spec=te needs Transformer Engine, which is not installed here",
    )


@pytest.mark.parametrize(
    ("overrides", "length"),
    [
        ([], 37),  # the longest sample's inputs: 38 tokens less the last
        (["parallel.tp=2", "parallel.sp=true"], 38),  # each TP rank holds length / 2 tokens
        (["precision.fp8=hybrid"], 48),  # FP8 GEMMs take tokens in multiples of 16
        (["precision.fp8=hybrid", "parallel.tp=2", "parallel.sp=true"], 64),  # 32 per rank
        (["parallel.pp=2", "data.max_length=100"], 100),  # fixed under PP
        (["parallel.pp=2", "data.max_length=100", "precision.fp8=hybrid"], 112),
    ],
)
def test_micro_batch_length(overrides: list[str], length: int) -> None:
    from tiedlora_megatron.data.sft import Sample
    from tiedlora_megatron.finetune.config import load_job_config
    from tiedlora_megatron.finetune.job import _pad_length

    cfg = load_job_config(CONFIG, overrides)
    samples = [Sample(tuple(range(n - 4)), (1, 2, 3, 4), i) for i, n in enumerate((20, 38, 9))]
    assert _pad_length(samples, cfg) == length


def test_answers_are_generated_without_fp8() -> None:
    """megatron enters FP8 per forward from config.fp8; generation clears it, then restores it
    (also when generation fails)."""
    from megatron.core.transformer import TransformerConfig

    from tiedlora_megatron.finetune.job import fp8_disabled

    def config() -> TransformerConfig:
        c = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
        c.fp8 = "hybrid"  # set after construction: TransformerConfig checks TE for FP8
        return c

    shared, other = config(), config()
    chunk = torch.nn.Sequential(torch.nn.Module(), torch.nn.Module(), torch.nn.Linear(2, 2))
    chunk.config = shared
    chunk[0].config, chunk[1].config = shared, other
    with fp8_disabled([chunk]):
        assert shared.fp8 is None and other.fp8 is None
    assert shared.fp8 == "hybrid" and other.fp8 == "hybrid"
    with pytest.raises(RuntimeError, match="generation failed"), fp8_disabled([chunk]):
        raise RuntimeError("generation failed")
    assert shared.fp8 == "hybrid" and other.fp8 == "hybrid"


def test_generation_batches() -> None:
    from tiedlora_megatron.finetune.job import generation_batches

    lengths = [5, 5, 7, 5, 7, 9]
    order = [0, 1, 3, 2, 4, 5]  # sorted by length, as the job sorts them
    assert generation_batches(order, lengths, 2, False) == [[0, 1], [3, 2], [4, 5]]
    # TE spec: no batch mixes lengths (its attention would attend to the left padding).
    assert generation_batches(order, lengths, 2, True) == [[0, 1], [3], [2, 4], [5]]
    assert generation_batches([], lengths, 2, True) == []


def test_fp8_config_errors(tiny: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from packaging.version import Version

    from tiedlora_megatron.config import ConfigError
    from tiedlora_megatron.finetune import checks
    from tiedlora_megatron.finetune.config import load_job_config

    monkeypatch.setattr(checks, "te_available", lambda: True)
    monkeypatch.setattr("tiedlora_megatron.te.te_version", lambda: Version("2.1.0"))
    fp8 = ["model.spec=te", "precision.fp8=hybrid"]

    def check(overrides: list[str], world: int = 1) -> None:
        cfg = load_job_config(CONFIG, [*tiny, *fp8, *overrides])
        checks.validate(cfg, world_size=world, check_model=False)

    with pytest.raises(ConfigError, match="data.seq_length=40 must be a multiple of 32 under FP8"):
        check(["data.seq_length=40", "parallel.tp=2", "parallel.sp=true"], world=2)
    with pytest.raises(ConfigError, match="tensorwise needs Transformer Engine >= 2.2, found 2.1"):
        check(["precision.fp8_recipe=tensorwise"])
    check(["data.seq_length=64", "parallel.tp=2", "parallel.sp=true"], world=2)  # valid
