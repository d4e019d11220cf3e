"""The fine-tuning job on megatron-core's Transformer Engine spec, with and without FP8.

    python -m tests.gpu.check_te_job [--nproc N] [--out DIR]     # from the repository root

Needs a CUDA machine with megatron-core and Transformer Engine. On the tiny job of
tests/tiny_job.py (a random 4-layer Llama in HF format, a JSONL copy task), with vBuA on all four
targets and the same seed, it runs `tiedlora_megatron.finetune train` three times on N GPUs
(default: 1; with N > 1, TP = N with sequence parallel):

    local   model.spec=local, bf16
    te      model.spec=te, bf16
    fp8     model.spec=te, bf16 with precision.fp8=hybrid (delayed scaling)

and checks that the TE run's per-step losses equal the local run's within bf16 tolerance, that
the FP8 run's stay within FP8 tolerance of the TE run's and fall, and that the TE-trained
adapter checkpoint, evaluated on the local spec (`finetune eval --adapter`), gives the TE run's
validation loss: adapter checkpoints carry over between the specs. Every run also generates
answers for 8 test prompts (the TE spec batches prompts of one length; FP8 is off while
generating). Prints a table; exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_job import make_tiny_job

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "configs" / "tiny_gpt.yaml"
STEPS = 12
BF16_TOL, FP8_TOL = 2e-2, 1e-1  # relative, per step loss
RUNS = {
    "local": ["model.spec=local"],
    "te": ["model.spec=te"],
    "fp8": ["model.spec=te", "precision.fp8=hybrid", "precision.fp8_recipe=delayed"],
}


def job(command: str, nproc: int, overrides: list[str]) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "tiedlora_megatron.finetune", command,
        "--config", str(CONFIG), *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/check_te_job"))
    args = p.parse_args()
    tiny = [f"{k}={v}" for k, v in make_tiny_job(args.out / "tiny").items()]
    layout = [f"parallel.tp={args.nproc}", f"parallel.sp={args.nproc > 1}"]
    common = [
        *tiny,
        *layout,
        "precision.dtype=bf16",
        f"train.steps={STEPS}",
        "eval.num_examples=8",
    ]
    curves, val = {}, {}
    for name, extra in RUNS.items():
        out = args.out / name
        job("train", args.nproc, [*common, *extra, f"train.output_dir={out}"])
        curves[name] = losses(out)
        val[name] = json.loads((out / "summary.json").read_text())["tuned"]["val_loss"]
    # The TE run's adapter checkpoint, on the local spec.
    checkpoint = args.out / "te" / "checkpoints" / f"step_{STEPS:07d}"
    cross = args.out / "te_on_local"
    job(
        "eval",
        args.nproc,
        ["--adapter", str(checkpoint), *common, "model.spec=local", f"train.output_dir={cross}"],
    )
    val["te_on_local"] = json.loads((cross / f"eval_{checkpoint.name}.json").read_text())[
        "val_loss"
    ]

    rows: list[tuple[str, str, str, bool]] = []

    def worst(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))

    err = worst(curves["te"], curves["local"])
    rows.append(
        ("step losses, TE vs local (bf16)", f"{err:.2e}", f"<= {BF16_TOL}", err <= BF16_TOL)
    )
    err = worst(curves["fp8"], curves["te"])
    rows.append(("step losses, FP8 vs bf16 (TE)", f"{err:.2e}", f"<= {FP8_TOL}", err <= FP8_TOL))
    err = abs(val["te_on_local"] - val["te"]) / val["te"]
    rows.append(
        ("TE adapter on local spec: val loss", f"{err:.2e}", f"<= {BF16_TOL}", err <= BF16_TOL)
    )
    fp8 = curves["fp8"]
    rows.append(
        ("FP8 loss first -> last", f"{fp8[0]:.3f} -> {fp8[-1]:.3f}", "falls", fp8[-1] < fp8[0])
    )
    print(f"Transformer Engine job check, {args.nproc} GPU(s), {STEPS} steps")
    for name, value, bound, ok in rows:
        print(f"{'PASS' if ok else 'FAIL'} {name:<34} {value:>16}  {bound}")
    return int(not all(r[3] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
