"""The trade-off study driver (examples/study/run_study.py).

The plan (`--dry-run`) is checked command by command: the LR sweep, then the chosen LR scored on
test, then the other seeds at that LR. The report is built from synthetic results (chosen LR,
rows, ratio to LoRA, plot). The runner is checked with a stand-in for the job (finished jobs are
skipped, the LR is chosen once its sweep has run, `--only`), and once for real on the tiny job.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shlex
from pathlib import Path

import pytest

from examples.study import plan, run_study, runner
from tests.tiny_job import make_tiny_job

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "tiedlora_megatron.finetune"]
CONFIG = ["--config", "examples/configs/smollm2_squad.yaml"]
# lora and vBuA at rank 8 on linear_qkv, a 2-point LR sweep, vBuA with a second seed.
GRID = ["--tasks", "squad", "--presets", "lora,vBuA", "--ranks", "8", "--targets", "qkv",
        "--seeds", "0,1", "--seed-presets", "vBuA", "--lrs", "0.001,0.01", "--steps", "4",
        "--max-widenings", "0"]  # fmt: skip


def _run_dir(out: Path, preset: str, seed: int, lr: str) -> Path:
    return out / "squad" / f"{preset}_r8_qkv_s{seed}_lr{lr}"


def _train(out: Path, preset: str, seed: int, lr: str, select: str = "val_loss") -> str:
    """Ranked by loss, a training run generates no answers; by metric, it scores validation."""
    no_generation = ["eval.num_examples=-1"] if select == "val_loss" else []
    return shlex.join([
        *LAUNCH, "train", *CONFIG, "data.task=squad", f"adapter.preset={preset}", "adapter.rank=8",
        "adapter.alpha=8", "adapter.target_modules=[linear_qkv]", f"adapter.seed={seed}",
        f"train.seed={seed}", f"data.seed={seed}", f"optim.lr={lr}", "train.steps=4",
        "eval.before=false", "eval.split=validation", *no_generation,
        f"train.output_dir={_run_dir(out, preset, seed, lr)}",
    ])  # fmt: skip


def _test(out: Path, preset: str, seed: int, lr: str) -> str:
    d = _run_dir(out, preset, seed, lr)
    return shlex.join([
        *LAUNCH, "eval", *CONFIG, "--adapter", str(d / "checkpoints" / "step_0000004"),
        "data.task=squad", "eval.split=test", f"train.output_dir={d}",
    ])  # fmt: skip


def _base(out: Path) -> str:
    return shlex.join([*LAUNCH, "eval", *CONFIG, "data.task=squad", "eval.split=test",
                       f"train.output_dir={out / 'squad' / 'base'}"])  # fmt: skip


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _summary(d: Path, val_loss: float, f1: float, trainable: int, lora: int = 9216) -> None:
    """What the job's `train` writes, validation scores in `tuned` (eval.split=validation)."""
    _write(d / "summary.json", {
        "preset": d.name.split("_")[0], "rank": 8, "target_modules": ["linear_qkv"],
        "trainable_parameters": trainable, "lora_parameters": lora,
        "ratio_to_lora": trainable / lora, "steps": 4, "final_train_loss": 1.0,
        "train_seconds": 40.0, "job_seconds": 60.0, "base": None,
        "tuned": {"val_loss": val_loss, "exact_match": f1 - 10, "f1": f1, "eval_examples": 8},
    })  # fmt: skip


def _test_result(d: Path, f1: float) -> None:
    _write(d / "eval_step_0000004.json", {"val_loss": 1.0, "exact_match": f1 - 5, "f1": f1,
                                          "eval_examples": 100})  # fmt: skip


def _sweep(out: Path) -> None:
    """lora diverges at 0.01, so 0.001 wins; vBuA's loss prefers 0.01, its F1 0.001."""
    _summary(_run_dir(out, "lora", 0, "0.001"), 2.0, 20.0, 9216)
    _summary(_run_dir(out, "lora", 0, "0.01"), math.nan, 0.0, 9216)
    _summary(_run_dir(out, "vBuA", 0, "0.001"), 1.4, 30.0, 3000)
    _summary(_run_dir(out, "vBuA", 0, "0.01"), 1.2, 25.0, 3000)


def _commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_dry_run_sweeps_then_scores_the_chosen_lr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    assert run_study.main(["--out", str(out), *GRID, "--dry-run"]) == 0
    lr = plan.LR_PLACEHOLDER  # the sweep has not run
    printed = capsys.readouterr().out
    assert _commands(printed) == [
        _base(out),
        _train(out, "lora", 0, "0.001"),
        _train(out, "lora", 0, "0.01"),
        _test(out, "lora", 0, lr),
        _train(out, "vBuA", 0, "0.001"),
        _train(out, "vBuA", 0, "0.01"),
        _test(out, "vBuA", 0, lr),
        _train(out, "vBuA", 1, lr),
        _test(out, "vBuA", 1, lr),
    ]
    assert "# to go: 5 training runs x 4 steps = 3m20s at 10 s/step, plus 4 test" in printed
    assert not out.exists()  # a dry run writes nothing

    _sweep(out)
    assert run_study.main(["--out", str(out), *GRID, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert _commands(printed) == [
        _base(out),
        _test(out, "lora", 0, "0.001"),
        _test(out, "vBuA", 0, "0.01"),
        _train(out, "vBuA", 1, "0.01"),
        _test(out, "vBuA", 1, "0.01"),
    ]
    assert f"# done: {_train(out, 'lora', 0, '0.01')}" in printed.splitlines()


def test_seeds_at_caps_a_ranks_seeds(capsys: pytest.CaptureFixture) -> None:
    """--seeds-at 32=2 keeps rank 8's three seeds and runs the first two at rank 32."""
    args = run_study.parse_args([
        "--tasks", "squad", "--presets", "lora,vBuA", "--ranks", "8,32", "--targets", "qkv",
        "--seeds", "0,1,2", "--seed-ranks", "8,32", "--seeds-at", "32=2",
    ])  # fmt: skip
    seeds = {s.name: s.seeds for s in plan.build_grid(args)}
    assert seeds == {"lora_r8_qkv": (0, 1, 2), "vBuA_r8_qkv": (0, 1, 2),
                     "lora_r32_qkv": (0, 1), "vBuA_r32_qkv": (0, 1)}  # fmt: skip
    for bad in ("32", "32=0", "r32=2"):
        with pytest.raises(SystemExit):
            run_study.parse_args(["--seeds-at", bad])
        assert f"expected RANK=N with N >= 1, got {bad!r}" in capsys.readouterr().err


def test_study_keys_are_not_overrides(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run_study.parse_args(["optim.lr=0.1"])
    assert "optim.lr is set by the study for each job; use --lrs" in capsys.readouterr().err


@pytest.mark.parametrize(("select", "vbua_lr"), [("val_loss", "0.01"), ("metric", "0.001")])
def test_report_from_summaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, select: str, vbua_lr: str
) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    _sweep(out)
    _summary(_run_dir(out, "vBuA", 1, vbua_lr), 1.3, 28.0, 3000)
    _test_result(_run_dir(out, "lora", 0, "0.001"), 50.0)
    _test_result(_run_dir(out, "vBuA", 0, vbua_lr), 45.0)  # seed 1 not scored yet
    _write(out / "squad" / "base" / "eval_base.json",
           {"val_loss": 3.0, "exact_match": 1.0, "f1": 5.0, "eval_examples": 100})  # fmt: skip
    args = ["--out", str(out), *GRID, "--select", select, "--report-only"]
    assert run_study.main(args) == 0

    with (out / "results.csv").open() as f:
        rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    assert [(r["preset"], r.get("seed"), r.get("lr")) for r in rows] == [
        ("base", None, None),
        ("lora", "0", "0.001"),
        ("vBuA", "0", vbua_lr),
        ("vBuA", "1", vbua_lr),
    ]
    base, lora, vbua, vbua_seed1 = rows
    assert base["trainable_parameters"] == "0" and float(base["f1"]) == 5.0
    assert float(lora["ratio_to_lora"]) == 1.0 and float(lora["f1"]) == 50.0
    assert float(lora["val_loss"]) == 2.0 and float(lora["exact_match"]) == 45.0
    assert vbua["trainable_parameters"] == "3000"
    assert float(vbua["ratio_to_lora"]) == pytest.approx(3000 / 9216)
    assert float(vbua["f1"]) == 45.0 and vbua["targets"] == "qkv" and vbua["rank"] == "8"
    assert "f1" not in vbua_seed1 and float(vbua_seed1["val_loss"]) == 1.3
    assert vbua["run"] == f"squad/vBuA_r8_qkv_s0_lr{vbua_lr}"

    md = (out / "results.md").read_text()
    assert "| vBuA | 8 | qkv | 0 | 3,000 | 32.55 % |" in md
    chosen = "1.2" if select == "val_loss" else "30"
    assert f"**{chosen}**" in md  # the sweep table marks the choice
    commands = (out / "commands.sh").read_text().splitlines()
    assert _train(out, "vBuA", 1, vbua_lr, select) in commands
    assert _test(out, "lora", 0, "0.001") in commands
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "tradeoff_squad.png").read_bytes()[:4] == b"\x89PNG"


def test_runner_skips_finished_jobs_and_chooses_after_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in for the job writes what the job would; the base and one sweep run are done."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    ran: list[str] = []

    def job(argv: list[str], log, env) -> int:
        args = dict(a.split("=", 1) for a in argv if "=" in a)
        d = Path(args["train.output_dir"])
        ran.append(d.name + (" train" if "train" in argv else " test"))
        if "train" in argv:  # the larger LR has the lower validation loss
            _summary(d, 1.0 / float(args["optim.lr"]), 10.0, 3000)
            (d / "checkpoints" / "step_0000004").mkdir(parents=True)
        else:
            _test_result(d, 40.0)
        return 0

    monkeypatch.setattr(runner, "run_process", job)
    _write(out / "squad" / "base" / "eval_base.json", {"val_loss": 3.0, "f1": 5.0})
    _summary(_run_dir(out, "lora", 0, "0.001"), 2.0, 20.0, 9216)
    (_run_dir(out, "lora", 0, "0.001") / "checkpoints" / "step_0000004").mkdir(parents=True)

    assert run_study.main(["--out", str(out), *GRID, "--only", "3"]) == 0
    # lora's finished sweep run (loss 2.0) beats the new one (100): its checkpoint is scored.
    assert ran == ["lora_r8_qkv_s0_lr0.01 train", "lora_r8_qkv_s0_lr0.001 test",
                   "vBuA_r8_qkv_s0_lr0.001 train"]  # fmt: skip
    ran.clear()
    assert run_study.main(["--out", str(out), *GRID]) == 0
    assert ran == ["vBuA_r8_qkv_s0_lr0.01 train", "vBuA_r8_qkv_s0_lr0.01 test",
                   "vBuA_r8_qkv_s1_lr0.01 train", "vBuA_r8_qkv_s1_lr0.01 test"]  # fmt: skip
    assert (_run_dir(out, "vBuA", 0, "0.01") / "train.log").is_file()
    ran.clear()
    assert run_study.main(["--out", str(out), *GRID]) == 0
    assert ran == []
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4  # base, lora, vBuA x 2 seeds


def test_a_finished_run_without_its_checkpoint_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A study copied without checkpoints (as committed) cannot score a run trained elsewhere:
    the study says which checkpoint is missing and how to go on, and starts no job."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    ran: list[list[str]] = []
    monkeypatch.setattr(runner, "run_process", lambda argv, log, env: ran.append(argv))
    _write(out / "squad" / "base" / "eval_base.json", {"val_loss": 3.0, "f1": 5.0})
    _sweep(out)  # lora's sweep has finished: its 0.001 run waits for its test score
    assert run_study.main(["--out", str(out), *GRID, "--match", "squad/lora_*"]) == 1
    err = capsys.readouterr().err
    missing = _run_dir(out, "lora", 0, "0.001") / "checkpoints" / "step_0000004"
    assert f"the checkpoint to score, {missing}, is not here" in err
    assert f"remove {_run_dir(out, 'lora', 0, '0.001') / 'summary.json'} to train" in err
    assert ran == []
    assert (out / "results.csv").is_file()  # the report still shows how far the study got


def test_mini_study_on_the_tiny_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real job on 1 rank: two presets, one LR, 2 steps. Each job is a process start
    (~10 s of imports), so the base model and vBuA's test score, the same `eval` command as
    lora's, are left out (`--match`, `--only 3`)."""
    overrides = [f"{k}={v}" for k, v in make_tiny_job(tmp_path / "tiny").items()]
    out = tmp_path / "study"
    args = ["--out", str(out), "--config", str(ROOT / "examples/configs/tiny_gpt.yaml"),
            "--tasks", "squad", "--presets", "lora,vBuA", "--ranks", "4", "--targets", "qkv",
            "--seeds", "0", "--lrs", "0.01", "--steps", "2", "--nproc", "1",
            "--match", "squad/*_r4_qkv", "--only", "3", *overrides]  # fmt: skip
    assert run_study.main(args) == 0
    assert "stopping: --only 3 jobs ran" in capsys.readouterr().out
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["preset"], r["lr"], r["run"]) for r in rows] == [
        ("lora", "0.01", "squad/lora_r4_qkv_s0_lr0.01"),
        ("vBuA", "0.01", "squad/vBuA_r4_qkv_s0_lr0.01"),
    ]
    lora, vbua = rows
    assert float(lora["ratio_to_lora"]) == 1.0 > float(vbua["ratio_to_lora"]) > 0
    assert 0 < float(vbua["val_loss"]) < 20 and vbua["f1"] == ""
    assert 0 < float(lora["val_loss"]) < 20
    assert lora["test_examples"] == "8" and 0 <= float(lora["f1"]) <= 100
    summary = json.loads((out / "squad" / "vBuA_r4_qkv_s0_lr0.01" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["target_modules"] == ["linear_qkv"]


QUESTIONS = [(f"question {i}", f"answer {i}") for i in range(8)]


def test_sweep_widens_off_its_edges_and_the_report_compares_with_lora(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in job: LoRA's loss is lowest at the grid's low edge, and one rate below is worse
    (chosen inside); vBuA's keeps falling past the top edge (chosen at the widening limit, and
    flagged). Scored on 8 questions, vBuA answers all, LoRA the first 4, with both seeds: vBuA
    ahead in exact match by 50 points, its interval that of a Binomial(8, 1/2) / 8 (12.5 to
    87.5 points); both F1s are identical per question where both answer, and vBuA's 8 answers
    are right, so F1 is ahead by the same 50."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    ran: list[str] = []

    def loss(preset: str, lr: float) -> float:
        return 1 + abs(math.log10(lr) + 3) if preset == "lora" else 1 / lr

    def job(argv: list[str], log, env) -> int:
        args = dict(a.split("=", 1) for a in argv if "=" in a)
        d = Path(args["train.output_dir"])
        preset = d.name.split("_")[0]
        if "train" in argv:
            ran.append(f"{d.name} train")
            _summary(d, loss(preset, float(args["optim.lr"])), 10.0, 3000)
            (d / "checkpoints" / "step_0000004").mkdir(parents=True)
            return 0
        ran.append(f"{d.name} test")
        assert args["eval.num_examples"] == "8"
        right = len(QUESTIONS) if preset == "vBuA" else 4
        rows = [{"index": i, "prediction": a if i < right else "no idea", "references": [a]}
                for i, (_, a) in enumerate(QUESTIONS)]  # fmt: skip
        (d / "eval_step_0000004_predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
        em = 100.0 * right / len(QUESTIONS)
        _write(d / "eval_step_0000004.json", {"val_loss": 1.0, "exact_match": em, "f1": em,
               "eval_examples": 8, "predictions": "eval_step_0000004_predictions.jsonl"})  # fmt: skip
        return 0

    monkeypatch.setattr(runner, "run_process", job)
    _write(out / "squad" / "base" / "eval_base.json", {"val_loss": 3.0, "f1": 5.0})
    grid = ["--tasks", "squad", "--presets", "lora,vBuA", "--ranks", "8", "--targets", "qkv",
            "--seeds", "0,1", "--seed-presets", "lora,vBuA", "--lrs", "0.001,0.01",
            "--steps", "4", "--max-widenings", "1", "--test-examples", "8"]  # fmt: skip
    assert run_study.main(["--out", str(out), *grid]) == 0
    assert ran == [
        "lora_r8_qkv_s0_lr0.001 train", "lora_r8_qkv_s0_lr0.01 train",
        "lora_r8_qkv_s0_lr0.0001 train",  # below the low edge: worse, so 0.001 is inside
        "lora_r8_qkv_s0_lr0.001 test", "lora_r8_qkv_s1_lr0.001 train",
        "lora_r8_qkv_s1_lr0.001 test",
        "vBuA_r8_qkv_s0_lr0.001 train", "vBuA_r8_qkv_s0_lr0.01 train",
        "vBuA_r8_qkv_s0_lr0.1 train",  # still the edge, and the limit: chosen
        "vBuA_r8_qkv_s0_lr0.1 test", "vBuA_r8_qkv_s1_lr0.1 train", "vBuA_r8_qkv_s1_lr0.1 test",
    ]  # fmt: skip

    md = (out / "results.md").read_text()
    assert "(at most 1 rate per side)" in md and "same 8 test questions" in md
    assert "| lr 0.0001 | lr 0.001 | lr 0.01 | lr 0.1 |" in md
    assert "| lora | 8 | qkv | 2 | **1** | 2 |  |  |" in md
    assert "| vBuA | 8 | qkv |  | 1000 | 100 | **10** | on the edge at the widening limit |" in md
    row = next(line for line in md.splitlines() if line.startswith("| 8 | qkv | vBuA | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:6] == ["10.0000 ± 0.0000", "1.0000 ± 0.0000"]
    assert cells[6] == "100.0 / 50.0" and cells[8] == "**vBuA ahead**"
    assert cells[7] == "+50.0 [+12.5, +87.5]"
    assert cells[9:] == ["100.0 / 50.0", "+50.0 [+12.5, +87.5]", "**vBuA ahead**"]
    kept = out / "squad" / "lora_r8_qkv_s1_lr0.001" / "eval_step_0000004_question_scores.json"
    assert json.loads(kept.read_text())["scores"]["exact_match"] == [100.0] * 4 + [0.0] * 4

    # The per-question scores are what the report reads back: they must agree with the result.
    result = kept.with_name("eval_step_0000004.json")
    _write(result, {**json.loads(result.read_text()), "exact_match": 40.0})
    assert run_study.main(["--out", str(out), *grid, "--report-only"]) == 1
