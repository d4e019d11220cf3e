"""Exports never destroy what they read: an output that is, lies in or contains the base model or
the adapter checkpoint is refused (symlinks resolved), `overwrite` replaces only an earlier
export (recognised by its marker file), and a replacement that fails leaves the old export.

One gloo rank exports a small random HF Llama's adapter through the Python API; the CLI cases
run `tiedlora-megatron export` as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import ProcessGroupPool
from tests.tiny_job import tiny_llama_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TARGETS = ["linear_qkv", "linear_fc2"]
MARKER = ".tiedlora_export.json"


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(1) as p:
        yield p


def _api_cases(root: str) -> dict:
    """Every refusal through export_peft / export_merged_hf, then a working overwrite and a
    failed one."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import tiedlora_megatron.export as ex
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
    from tiedlora_megatron.export import ExportError, export_merged_hf, export_peft
    from tiedlora_megatron.models import load_hf_model

    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    base, ckpt, out = Path(root) / "base", Path(root) / "ckpt", Path(root) / "export"
    result: dict = {}
    try:
        chunks, _ = load_hf_model(base)
        cfg = TiedLoRAConfig.preset("vBuA", rank=4, alpha=8, target_modules=TARGETS)
        adapters = apply_tied_lora(chunks, cfg)
        save_adapter_checkpoint(ckpt, chunks, adapters)
        load_adapter_checkpoint(ckpt, chunks, adapters)  # exports now keep off `ckpt` too

        def attempt(name, export, out_dir, **kwargs):
            try:
                export(adapters, chunks, base, out_dir, **kwargs)
                result[name] = None
            except (ExportError, FileExistsError, RuntimeError) as e:
                result[name] = f"{type(e).__name__}: {e}"

        (Path(root) / "link").symlink_to(base)
        foreign = Path(root) / "foreign"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("not an export")
        attempt("out_is_base_merged", export_merged_hf, base, overwrite=True)
        attempt("out_is_base_peft", export_peft, base, overwrite=True)
        attempt("out_in_base", export_peft, base / "peft")
        attempt("out_contains_base", export_merged_hf, Path(root), overwrite=True)
        attempt("out_links_base", export_merged_hf, Path(root) / "link", overwrite=True)
        attempt("out_is_adapter", export_peft, ckpt, overwrite=True)
        attempt("out_in_adapter", export_peft, ckpt / "peft")
        attempt("foreign", export_peft, foreign, overwrite=True)

        export_peft(adapters, chunks, base, out)
        first = (out / "adapter_model.safetensors").read_bytes()
        attempt("exists", export_peft, out)
        with torch.no_grad():
            for p in adapters.parameters():
                p.add_(0.25)
        export_peft(adapters, chunks, base, out, overwrite=True)
        second = (out / "adapter_model.safetensors").read_bytes()
        result["replaced"] = first != second
        result["marker"] = json.loads((out / MARKER).read_text())
        # A replacement that dies while writing leaves the previous export as it was.
        saved = ex.save_safetensors

        def crash(*args, **kwargs):
            raise RuntimeError("simulated crash")

        ex.save_safetensors = crash
        try:
            attempt("crash", export_merged_hf, out, overwrite=True)
        finally:
            ex.save_safetensors = saved
        result["kept_after_crash"] = (out / "adapter_model.safetensors").read_bytes() == second
        result["listing_after_crash"] = sorted(p.name for p in out.iterdir())
        # An export replaces an export of the other format too.
        export_merged_hf(adapters, chunks, base, out, overwrite=True)
        result["merged_marker"] = json.loads((out / MARKER).read_text())
    finally:
        ps.destroy_model_parallel()
    return result


@pytest.fixture(scope="module")
def api(pool, tmp_path_factory) -> tuple[Path, dict, dict[str, str]]:
    import torch

    root = tmp_path_factory.mktemp("safety")
    torch.manual_seed(0)
    config = tiny_llama_config()
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    before = _tree_digest(root / "base")
    [result] = pool.run(_api_cases, str(root))
    return root, result, before


def test_out_equal_to_inside_or_containing_the_base_is_refused(api):
    root, r, before = api
    base = root / "base"
    assert _tree_digest(base) == before  # not a byte of the base changed
    for case in ("out_is_base_merged", "out_is_base_peft"):
        assert r[case].startswith("ExportError: the output directory")
        assert f"{base} (resolved: {base.resolve()}) is the base model {base}" in r[case]
    assert f"output directory {base / 'peft'}" in r["out_in_base"]
    assert "is inside the base model" in r["out_in_base"]
    assert f"output directory {root} " in r["out_contains_base"]
    assert "contains the base model" in r["out_contains_base"]
    link = root / "link"
    assert (
        f"output directory {link} (resolved: {base.resolve()}) is the base model"
        in (r["out_links_base"])
    )
    assert not (base / "peft").exists() and link.is_symlink()


def test_out_at_the_adapter_checkpoint_is_refused(api):
    root, r, _ = api
    ckpt = root / "ckpt"
    assert "is the adapter checkpoint these adapters were loaded from" in r["out_is_adapter"]
    assert f"{ckpt}" in r["out_is_adapter"]
    assert "is inside the adapter checkpoint" in r["out_in_adapter"]
    from tiedlora_megatron.checkpoint import verify_adapter_checkpoint

    verify_adapter_checkpoint(ckpt)  # intact


def test_overwrite_replaces_only_an_earlier_export(api):
    root, r, _ = api
    foreign = root / "foreign"
    assert "was not written by this tool (no readable .tiedlora_export.json" in r["foreign"]
    assert (foreign / "notes.txt").read_text() == "not an export"
    assert "exists; pass overwrite=True" in r["exists"]
    assert r["replaced"]
    marker = r["marker"]
    assert marker["tool"] == "tiedlora-megatron export" and marker["format"] == "peft"
    assert marker["base"] == str(root / "base") and marker["written_at"]
    assert marker["adapter_checkpoint"] == str(root / "ckpt")
    assert "adapter_model.safetensors" in marker["files"]
    assert r["merged_marker"]["format"] == "merged-hf"
    assert (root / "export" / "model.safetensors").is_file()
    assert not (root / ".export.partial").exists() and not (root / ".export.old").exists()


def test_failed_replacement_keeps_the_previous_export(api):
    _, r, _ = api
    assert r["crash"] == "RuntimeError: simulated crash"
    assert r["kept_after_crash"]
    assert r["listing_after_crash"] == [MARKER, "adapter_config.json", "adapter_model.safetensors"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tiedlora_megatron.cli", "export", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_refuses_base_as_out_and_a_tampered_checkpoint(api, tmp_path):
    root, _, before = api
    base, ckpt = root / "base", root / "ckpt"
    done = _cli(
        "--base", str(base), "--adapter", str(ckpt), "--format", "merged-hf", "--out", str(base)
    )
    done_overwrite = _cli(
        *("--base", str(base), "--adapter", str(ckpt), "--format", "merged-hf"),
        *("--out", str(base), "--overwrite"),
    )
    for d in (done, done_overwrite):
        assert d.returncode == 2, d.stderr
        assert f"{base} (resolved: {base.resolve()}) is the base model {base}" in d.stderr
    assert _tree_digest(base) == before

    tampered = tmp_path / "tampered"
    shutil.copytree(ckpt, tampered)
    meta = json.loads((tampered / "tiedlora.json").read_text())
    meta["adapter_config"]["target_modules"] = ["linear_qkv"]  # fewer than stored
    (tampered / "tiedlora.json").write_text(json.dumps(meta))
    done = _cli(
        *("--base", str(base), "--adapter", str(tampered), "--format", "peft"),
        *("--out", str(tmp_path / "out")),
    )
    assert done.returncode == 2
    assert "stored tensor 'tied_adapter.linear_fc2.A': target 'linear_fc2'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_overwrites_its_own_export(api, tmp_path):
    root, _, _ = api
    args = ["--base", str(root / "base"), "--adapter", str(root / "ckpt"), "--format", "peft"]
    out = tmp_path / "out"
    first = _cli(*args, "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert json.loads((out / MARKER).read_text())["adapter_checkpoint"] == str(root / "ckpt")
    again = _cli(*args, "--out", str(out), "--overwrite")
    assert again.returncode == 0, again.stderr
