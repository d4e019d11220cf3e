"""`tiedlora-finetune eval --data FILE`: any JSONL file scored without a task, every prediction
kept, results named after the file and the checkpoint.

Checked against references written here, not the package's: EM / F1 worked by hand on a small
set, and SQuAD's normalisation re-implemented to recompute each run's metrics from its
predictions.jsonl. Answer cleanup on realistic base-model outputs; the continuation past a
leading line break with a scripted generator; the built-in prompt builders. End to end on the
tiny random Llama (tests/tiny_job.py): one rank, two data-parallel ranks (same answers), a chat
file, a refused overwrite, and one-line errors for a bad path, a bad line and misuse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.data import (
    METRIC_SETS,
    TASKS,
    DataError,
    Example,
    clean_answer,
    gsm_prompt,
    score_metrics,
    squad,
    squad_prompt,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "tiny_gpt.yaml"
PREFIX = "tiedlora-finetune: error: "


# --- independent references ------------------------------------------------------------------


def _norm(text: str) -> list[str]:
    """SQuAD v1.1's normalisation, written out again: lowercase, no punctuation, no articles."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _em(pred: str, refs: list[str]) -> float:
    return float(any(_norm(pred) == _norm(r) for r in refs))


def _f1(pred: str, refs: list[str]) -> float:
    best = 0.0
    for r in refs:
        p, g = _norm(pred), _norm(r)
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


# --- metrics and answer cleanup --------------------------------------------------------------


def test_metric_sets_hand_worked():
    preds = ["Paris", "Eiffel Tower in Paris", "France", "blue"]
    refs = [["Paris"], ["the Eiffel Tower"], ["Germany", "France."], ["red"]]
    # EM: 1, 0, 1, 0 -> 50. F1: 1; [eiffel, tower, in, paris] vs [eiffel, tower]: P = 1/2, R = 1,
    # F1 = 2/3; 1 (best reference); 0 -> (1 + 2/3 + 1 + 0) / 4 = 66.67.
    out = score_metrics(METRIC_SETS["squad"], preds, refs)
    assert out == pytest.approx({"exact_match": 50.0, "f1": 100 * (8 / 3) / 4})
    assert score_metrics(METRIC_SETS["exact"], preds, refs) == {"exact_match": 50.0}
    # number: the last number of the answer; "1,234" is 1234, "8.0" is 8.
    nums = score_metrics(
        METRIC_SETS["number"], ["1,234 apples", "8.0", "7 or 9"], [["1234"], ["8"], ["7"]]
    )
    assert nums == pytest.approx({"accuracy": 100 * 2 / 3})


def test_cleanup_and_score_on_base_model_outputs():
    """What a base model writes, cleaned, then scored: 3 of 4 exact after cleanup."""
    raw = [
        "\nParis",
        "The answer is: the Eiffel Tower.",
        "Answer: France\nExplanation: ...",
        " blue",
    ]
    preds = [clean_answer(r, short=True) for r in raw]
    assert preds == ["Paris", "the Eiffel Tower.", "France", "blue"]
    refs = [["Paris"], ["Eiffel Tower"], ["France"], ["red"]]
    assert score_metrics(METRIC_SETS["squad"], preds, refs) == pytest.approx(
        {"exact_match": 75.0, "f1": 75.0}
    )


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        ("\nParis", "Paris"),
        (" Paris\n", "Paris"),
        ("\n\n  Paris\nLyon", "Paris"),
        ("The answer is: Paris", "Paris"),
        ("the answer is Paris.", "Paris."),
        ("Answer: 42\nExplanation: 6 x 7 = 42", "42"),
        ("answer : 42", "42"),
        ("A: Denver Broncos\nQ: Who lost?", "Denver Broncos"),
        ("Final answer: 7", "7"),
        ("The final answer is 7", "7"),
        ("ANSWER:\n\nParis", "Paris"),  # a bare preamble line is skipped
        ("Answer: The answer is Rome", "Rome"),
        ("\n\n \n", ""),
        ("Answer:", ""),
        # kept as they are
        ("Answers vary by region", "Answers vary by region"),
        ("A. Lincoln", "A. Lincoln"),
        ("A", "A"),
        ("The answer", "The answer"),
        ("Answering machine", "Answering machine"),
        ("The answer isn't known", "The answer isn't known"),
        ("a:b ratio", "a:b ratio"),
        ("Paris, not Answer: Lyon", "Paris, not Answer: Lyon"),
    ],
)
def test_short_answer_cleanup(raw, answer):
    assert clean_answer(raw, short=True) == answer


def test_long_answers_are_kept_whole():
    solution = "\nStep 1: 3 + 4 = 7\nThe answer is 7\n#### 7\n"
    assert clean_answer(solution, short=False) == solution.strip()


# --- prompt builders -------------------------------------------------------------------------


def test_prompt_builders_are_the_tasks_prompts(tmp_path, monkeypatch):
    assert (
        squad_prompt("Denver won.", "Who won?")
        == "Context: Denver won.\nQuestion: Who won?\nAnswer:"
    )
    assert gsm_prompt("What is 2 + 3?") == "Question: What is 2 + 3?\nAnswer:"
    assert TASKS["squad"].prompt is squad_prompt and TASKS["gsm"].prompt is gsm_prompt
    assert TASKS["squad"].short_answer and not TASKS["gsm"].short_answer
    article = {
        "title": "T",
        "paragraphs": [
            {"context": "Ctx one.", "qas": [{"question": "Q?", "answers": [{"text": "A"}]}]}
        ],
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [article] * 1, "version": "1.1"}))
    monkeypatch.setenv("TIEDLORA_SQUAD_JSON", str(path))
    (only,) = [e for s in ("train", "validation", "test") for e in squad(s)]
    assert only.prompt == squad_prompt("Ctx one.", "Q?")


# --- generation past a leading line break (a scripted generator, no model) -------------------


class _CharTokenizer:
    """One token per character (id = code point + 10); eos 3."""

    eos_token_ids = [3]
    pad_id = 0
    has_chat_template = False

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 10 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 10) for i in ids if i >= 10)


class _Chunk(torch.nn.Module):
    vocab_size = 1000
    max_sequence_length = 64


SCRIPTS = {
    "P1": "\nParis\nmore text",
    "P2": "Answer:\n42\nExplanation",
    "P3": "Answer: Rome\nwhy",
    "P4": "\n" * 50,
    "P5": "Oslo",
}


def _scripted_generate(calls: list):
    tok = _CharTokenizer()

    def generate(chunks, prompts, *, vocab_size, max_new_tokens, eos_token_ids, pad_id):
        outs = []
        for ids in prompts:
            text = tok.decode(ids)
            key = text[:2]
            continuation = tok.encode(SCRIPTS[key][len(text) - 2 :]) + [3]
            out = []
            for t in continuation[:max_new_tokens]:
                out.append(t)
                if t in eos_token_ids:
                    break
            outs.append(out)
            calls.append((key, max_new_tokens))
        return outs

    return generate


@pytest.fixture
def scripted(monkeypatch):
    import megatron.core.parallel_state as ps
    import torch.distributed as dist

    calls: list = []
    monkeypatch.setattr("tiedlora_megatron.models.generate", _scripted_generate(calls))
    monkeypatch.setattr(ps, "get_data_parallel_group", lambda: None)
    monkeypatch.setattr(
        dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(0, obj)
    )
    return calls


def _answers(short: bool, max_new: int = 8, source: str = "f.jsonl") -> list[str]:
    from tiedlora_megatron.finetune.build import Runtime
    from tiedlora_megatron.finetune.config import JobConfig
    from tiedlora_megatron.finetune.evaluation import generate_answers

    examples = [Example(k, "x") for k in SCRIPTS]
    rt = Runtime(torch.device("cpu"), True, 0, 1)
    return generate_answers(
        [_Chunk()], examples, JobConfig(), rt, _CharTokenizer(), short=short, max_new=max_new,
        source=source,
    )  # fmt: skip


def test_generation_goes_on_past_a_leading_line_break(scripted):
    texts = _answers(short=True, max_new=16)
    assert texts == ["\nParis\n", "Answer:\n42\n", "Answer: Rome\n", "\n" * 16, "Oslo"]
    assert [clean_answer(t, short=True) for t in texts] == ["Paris", "42", "Rome", "", "Oslo"]
    # P1 went on after its first token (15 left), P2 after "Answer:\n" (8 left); P4 gave one
    # line break per call until the budget was spent; P3 and P5 needed one call.
    assert ("P1", 15) in scripted and ("P2", 8) in scripted
    assert [sum(k == key for k, _ in scripted) for key in SCRIPTS] == [2, 2, 1, 16, 1]


def test_long_answers_run_to_the_budget(scripted):
    texts = _answers(short=False, max_new=30)
    assert texts[0] == "\nParis\nmore text" and texts[3] == "\n" * 30
    assert all(n == 30 for _, n in scripted)  # one call each, no continuation


def test_a_prompt_without_room_for_the_answer_is_named(scripted):
    with pytest.raises(DataError, match=r"my\.jsonl: example 1 has a 2-token prompt; with 63 new"):
        _answers(short=True, max_new=63, source="my.jsonl")


def test_destination_keeps_another_runs_result(tmp_path):
    from tiedlora_megatron.finetune.evaluation import check_destination

    dest = tmp_path / "eval" / "qa" / "step_0000004"
    mine = {"data": "/d/qa.jsonl", "model": "hf:/m", "adapter": "/run1/checkpoints/step_0000004"}
    check_destination(dest, mine)  # nothing there: fine, and the parent exists now
    assert dest.parent.is_dir()
    dest.mkdir()
    (dest / "result.json").write_text(json.dumps({**mine, "exact_match": 10.0}))
    check_destination(dest, mine)  # the same run scored again replaces its result
    other = {**mine, "adapter": "/run2/checkpoints/step_0000004"}
    with pytest.raises(ConfigError, match=r"holds the result of another run \(adapter /run1/"):
        check_destination(dest, other)


# --- the command, end to end on the tiny model -----------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.tiny_job import make_tiny_job

    root = tmp_path_factory.mktemp("tiny")
    overrides = make_tiny_job(root)
    model_only = [
        f"model.path={overrides['model.path']}", f"model.tokenizer={overrides['model.tokenizer']}",
        "data.train=null", "data.validation=null", "data.test=null",
    ]  # fmt: skip
    return {"root": root, "model_only": model_only, "model": overrides["model.path"]}


def _cli(nproc: int, args: list[str], env_extra: dict | None = None, ok: bool = True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]  # fmt: skip
    cmd = [*launcher, "-m", "tiedlora_megatron.finetune", "eval", "--config", str(CONFIG), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TIEDLORA_DEBUG"):
        env.pop(name, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    if ok:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(folder: Path) -> tuple[dict, list[dict]]:
    result = json.loads((folder / "result.json").read_text())
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return result, rows


def _recomputed(rows: list[dict], metric: str) -> dict[str, float]:
    fns = {"exact_match": _em, "f1": _f1}
    return {
        name: 100 * sum(fns[name](r["prediction"], r["references"]) for r in rows) / len(rows)
        for name in METRIC_SETS[metric]
    }


CONTEXTS = [
    ("The red cat sat by the river.", "Where did the cat sit?", "by the river"),
    ("Stone birds fly over green trees.", "What flies?", "stone birds"),
    ("The moon is blue tonight.", "What colour is the moon?", "blue"),
    ("A dog and a fish swim.", "Who swims?", "a dog and a fish"),
    ("The sun warms the stone.", "What does the sun warm?", "the stone"),
]


@pytest.fixture(scope="module")
def scored(tiny, tmp_path_factory) -> dict:
    """File A on one rank, then file B (A's prompts, references from A's answers) on two
    data-parallel ranks into the same output folder. data.task=squad stays set, with SQuAD
    pointed at nothing: a SQuAD load would fail the run."""
    d = tmp_path_factory.mktemp("scored")
    a = _write(
        d / "qa_a.jsonl", [{"input": squad_prompt(c, q), "output": ans} for c, q, ans in CONTEXTS]
    )
    out = d / "out"
    no_squad = {
        "TIEDLORA_SQUAD_JSON": str(d / "no_squad.json"),
        "TIEDLORA_DATA_DIR": str(d / "none"),
    }
    common = [*tiny["model_only"], "data.task=squad", f"train.output_dir={out}"]
    first = _cli(1, [*common, "--data", str(a)], no_squad)
    _, rows_a = _read(out / "eval" / "qa_a" / "base")
    # B's references: A's answer for the even rows that have one, a word no answer has elsewhere.
    hits = [i for i, r in enumerate(rows_a) if i % 2 == 0 and _norm(r["prediction"])]
    b_rows = [
        {
            "input": r["prompt"],
            "output": "x",
            "references": [r["prediction"] if i in hits else "zzqx"],
        }
        for i, r in enumerate(rows_a)
    ]
    b = _write(d / "qa_b.jsonl", b_rows)
    second = _cli(2, [*common, "--data", str(b)], no_squad)
    return {
        "a": a,
        "b": b,
        "out": out,
        "first": first,
        "second": second,
        "hits": hits,
        "common": common,
    }


def test_every_prediction_is_saved_and_rescorable(scored):
    result, rows = _read(scored["out"] / "eval" / "qa_a" / "base")
    assert len(rows) == len(CONTEXTS) == result["examples"]
    assert [r["index"] for r in rows] == list(range(len(CONTEXTS)))
    for row, (c, q, ans) in zip(rows, CONTEXTS, strict=True):
        assert row["prompt"] == squad_prompt(c, q)  # the input, verbatim: the squad prompt rule
        assert row["references"] == [ans]
        assert row["prediction"] == clean_answer(row["generated"], short=True)
        assert row["exact_match"] == _em(row["prediction"], [ans])
        assert row["f1"] == pytest.approx(_f1(row["prediction"], [ans]))
    assert result["metric"] == "squad" and result["adapter"] is None and result["step"] is None
    assert result["data"] == str(scored["a"].resolve())
    expected = _recomputed(rows, "squad")
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    log = scored["first"].stdout
    assert str(scored["a"]) in log and "squad (test)" not in log and "val_loss" not in log


def test_two_files_do_not_collide_and_ranks_agree(scored):
    result_a, rows_a = _read(scored["out"] / "eval" / "qa_a" / "base")
    result_b, rows_b = _read(scored["out"] / "eval" / "qa_b" / "base")
    assert result_a["data"] != result_b["data"] and len(rows_b) == len(rows_a)
    # Two data-parallel ranks give the one-rank answers, in file order.
    assert [r["generated"] for r in rows_b] == [r["generated"] for r in rows_a]
    hits = scored["hits"]
    assert hits, "no usable answer to build references from"
    # Rows in `hits` match exactly (EM 1, F1 1), the others share nothing with "zzqx".
    share = 100 * len(hits) / len(rows_b)
    assert result_b["exact_match"] == pytest.approx(share) and result_b["f1"] == pytest.approx(
        share
    )
    assert str(scored["b"]) in scored["second"].stdout


def test_chat_file_with_exact_metric(tiny, scored):
    d = scored["out"].parent
    rows = [
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": squad_prompt(c, q)},
                      {"role": "assistant", "content": ans}], "references": [ans, ans.upper()]}
        for c, q, ans in CONTEXTS[:3]
    ]  # fmt: skip
    chat = _write(d / "chat_c.jsonl", rows)
    _cli(1, [*tiny["model_only"], f"train.output_dir={scored['out']}", "data.template=chat",
             "--data", str(chat), "--metric", "exact"])  # fmt: skip
    result, saved = _read(scored["out"] / "eval" / "chat_c" / "base")
    assert len(saved) == 3 and result["metric"] == "exact" and "f1" not in result
    assert saved[0]["prompt"] == rows[0]["messages"][:2]
    assert result["exact_match"] == pytest.approx(_recomputed(saved, "exact")["exact_match"])


def test_another_models_result_is_not_overwritten(tiny, scored):
    other = tiny["root"] / "other_model"
    if not other.exists():
        shutil.copytree(tiny["model"], other)
    before = (scored["out"] / "eval" / "qa_a" / "base" / "result.json").read_bytes()
    proc = _cli(1, [*tiny["model_only"], f"model.path={other}", f"train.output_dir={scored['out']}",
                    "--data", str(scored["a"])], ok=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1 and "holds the result of another run (model hf:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (scored["out"] / "eval" / "qa_a" / "base" / "result.json").read_bytes() == before


# --- one-line errors before any process group ------------------------------------------------


@pytest.fixture
def single(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_ERROR_FILE",
                 "MASTER_ADDR", "MASTER_PORT", "TIEDLORA_DEBUG"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def _fails(capsys, args: list[str], message: str, command: str = "eval") -> None:
    import torch.distributed as dist

    from tiedlora_megatron.finetune.cli import main

    assert main([command, "--config", str(CONFIG), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(PREFIX) and err.count("\n") == 1 and message in err, err
    assert not dist.is_initialized()


def test_bad_data_path(tiny, single, capsys, tmp_path):
    _fails(capsys, [*tiny["model_only"], "--data", f"{tmp_path}/nope.jsonl"],
           f"eval.data (--data) {tmp_path}/nope.jsonl: no such file")  # fmt: skip


def test_bad_json_line_names_file_and_line(tiny, single, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n\n{"input": "c", "output": }\n')
    _fails(capsys, [*tiny["model_only"], "--data", str(bad)], f"{bad}:3: invalid JSON")


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"input": "q", "output": "7"}, {"input": "q", "output": "seven"}], ["--metric", "number"],
         "{f}: example 2: reference 'seven' is not a number"),
        ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
         [], "{f}: chat ('messages') examples need data.template=chat"),
    ],
)  # fmt: skip
def test_data_errors_name_the_file(tiny, single, capsys, tmp_path, rows, extra, message):
    f = _write(tmp_path / "d.jsonl", rows)
    _fails(capsys, [*tiny["model_only"], "--data", str(f), *extra], message.format(f=f))


def test_misused_keys(tiny, single, capsys, tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"input": "q", "output": "a"}])
    _fails(capsys, [*tiny["model_only"], "eval.metric=exact"], "eval.metric (--metric) applies to")
    _fails(capsys, [*tiny["model_only"], f"eval.data={f}"], "eval.data is read by the eval command",
           command="train")  # fmt: skip
    _fails(capsys, [*tiny["model_only"], f"eval.data={f}", "eval.metric=f1"],
           "eval.metric='f1'; choose one of None, squad, exact, number")  # fmt: skip
