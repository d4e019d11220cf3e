"""Smoke test of benchmarks/bench.py: the measurement runs on a tiny GPT at TP=2 and its table
has every column; the adapters' counted collectives are exactly T x r per adapted layer.
Timings are never asserted (the machine is shared)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.dist import ProcessGroupPool

SEQ, MICRO_BATCH, RANK = 16, 2, 4
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LAYERS = 2  # the "tiny" model


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(2) as p:
        yield p


def _bench(sp: bool) -> tuple[list[dict], str]:
    from benchmarks.bench import format_table, parse_args, run_benchmark

    argv = [
        "--model=tiny",
        f"--seq-len={SEQ}",
        f"--micro-batch={MICRO_BATCH}",
        f"--rank={RANK}",
        "--tp=2",
        "--methods=lora,vBuA",
        "--rounds=1",
        "--warmup=1",
        "--steps=1",
        *(["--sp"] if sp else []),
    ]
    args = parse_args(argv)
    rows = run_benchmark(args)
    return rows, format_table(rows, args)


@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_bench_table_and_adapter_collectives(pool, sp):
    tokens = SEQ * MICRO_BATCH
    adapted = LAYERS * len(TARGETS)
    fp32 = 4
    for rows, table in pool.run(_bench, sp):
        assert [r["method"] for r in rows] == ["lora", "vBuA"]
        lines = table.splitlines()
        assert len(lines) == 2 + 2 + len(rows)  # description, blank, header, rule, rows
        assert lines[2].count("|") == lines[4].count("|") == lines[5].count("|")
        for r in rows:
            for key in (
                "step_ms",
                "tokens_per_s",
                "time_vs_lora",
                "peak_mem_bytes",
                "train_state_bytes",
                "ckpt_bytes",
                "trainable_vs_lora",
            ):
                assert r[key] >= 0, key
            # Adam: two moments per parameter (plus a step counter per tensor)
            assert r["ckpt_bytes"] > 0 and r["moment_bytes"] >= 2 * r["param_bytes"]
            adapter = Counter(
                (x["op"], x["full_bytes"])
                for x in r["collective_records"]
                if x["category"] == "adapter"
            )
            full = tokens * RANK * fp32  # a T x r tensor
            if sp:  # forward all-gather + backward reduce-scatter (or the reverse), T x r full
                assert adapter == {("all_gather", full): adapted, ("reduce_scatter", full): adapted}
            else:
                assert adapter == {("all_reduce", full): adapted}
            assert r["adapter_collectives"] >= 2 * adapted if sp else adapted
            assert 0 < r["adapter_bytes_share"] < 1
        assert rows[1]["trainable_vs_lora"] < 1
