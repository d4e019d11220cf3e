"""Fine-tuning data: metrics against hand-worked numbers, answer-only loss masks checked with
the real SmolLM2 tokenizer, the batch schedule's coverage and determinism, JSONL errors, and
the fixed task splits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiedlora_megatron.data import (
    BatchSchedule,
    DataError,
    Example,
    Sample,
    collate,
    exact_match,
    f1,
    get_task,
    load_jsonl,
    numeric_accuracy,
    score,
    squad,
    tasks,
    tokenize,
)
from tiedlora_megatron.data.metrics import _METRICS
from tiedlora_megatron.data.tasks import TASKS, squad_json

# --- metrics ---------------------------------------------------------------------------------


def test_squad_metrics_hand_worked():
    # "the" is an article: "the denver broncos" normalises to "denver broncos".
    assert exact_match("The Denver Broncos!", ["Denver Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    # [broncos, of, denver] vs [denver, broncos]: 2 common, P = 2/3, R = 1, F1 = 0.8.
    assert f1("Broncos of Denver", ["Denver Broncos"]) == pytest.approx(0.8)
    # Max over references: [santa, clara, california] vs [santa, clara] gives P = 2/3, R = 1,
    # F1 = 0.8; vs "Levi's Stadium" ([levis, stadium]) nothing is shared.
    refs = ["Levi's Stadium", "Santa Clara"]
    assert f1("Santa Clara, California", refs) == pytest.approx(0.8)
    assert exact_match("Santa Clara, California", refs) == 0.0
    # Counts are clipped: [cat, cat] vs [cat] shares 1 token, P = 1/2, R = 1, F1 = 2/3.
    assert f1("the cat cat", ["a cat"]) == pytest.approx(2 / 3)
    # Punctuation is removed inside words: "Levi's" == "Levis".
    assert exact_match("levis stadium", refs) == 1.0
    assert f1("", ["Denver"]) == 0.0


def test_numeric_accuracy_takes_the_last_number():
    assert numeric_accuracy("3 + 4 = 7, so 1,234 in all.\n#### 1,234", "1234") == 1.0
    assert numeric_accuracy("#### 8.0", "8") == 1.0
    assert numeric_accuracy("She lost -5 points", "-5") == 1.0
    assert numeric_accuracy("12 apples, then 13", "12") == 0.0
    assert numeric_accuracy("no idea", "12") == 0.0
    with pytest.raises(DataError, match="not a number"):
        numeric_accuracy("12", "twelve")


def test_score_averages_percentages():
    # EM: 1 and 0 -> 50; F1: 1.0 and 0.8 (hand-worked above) -> 90.
    out = score("squad", ["Denver Broncos", "Broncos of Denver"], [["Denver Broncos"]] * 2)
    assert out == pytest.approx({"exact_match": 50.0, "f1": 90.0})
    assert score("gsm", ["#### 3", "#### 4"], [["3"], ["5"]]) == {"accuracy": 50.0}
    with pytest.raises(DataError, match="2 predictions for 1"):
        score("squad", ["a", "b"], [["a"]])


def test_task_registry():
    for spec in TASKS.values():
        assert set(spec.metrics) <= set(_METRICS)
        assert spec.max_new_tokens > 0
    with pytest.raises(DataError, match=r"did you mean 'squad'.*known tasks: \['gsm', 'squad'\]"):
        get_task("squda")


# --- tokenize and collate with the real SmolLM2 tokenizer -------------------------------------


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("transformers")
    from tiedlora_megatron.models.gguf import default_smollm2_path
    from tiedlora_megatron.models.tokenizer import load_tokenizer

    try:
        path = default_smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_tokenizer(path)


EXAMPLES = [
    Example("Context: Denver won Super Bowl 50.\nQuestion: Who won?\nAnswer:", "Denver Broncos"),
    Example("Question: What is 2 + 3?\nAnswer:", "5"),
    Example("Question: Name a colour of the sky at noon on a clear day.\nAnswer:", "blue"),
]


def test_collate_masks_exactly_the_answer(tok):
    samples, dropped = tokenize(EXAMPLES, tok, template="plain", max_length=64)
    assert dropped == 0 and [s.index for s in samples] == [0, 1, 2]
    batch = collate(samples, tok.pad_id)
    width = max(s.length for s in samples) - 1
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        k: (3, width) for k in ("tokens", "labels", "loss_mask", "position_ids")
    }
    assert batch["loss_mask"].dtype == torch.float32
    for row, (ex, s) in enumerate(zip(EXAMPLES, samples, strict=True)):
        n = s.length - 1
        tokens, labels, mask = (batch[k][row] for k in ("tokens", "labels", "loss_mask"))
        # The input and label rows are the sequence shifted by one; padding follows.
        assert tokens[:n].tolist() == list(s.prompt_ids + s.answer_ids)[:-1]
        assert labels[: n - 1].tolist() == tokens[1:n].tolist()
        assert (tokens[n:] == tok.pad_id).all() and not mask[n:].any()
        # The masked labels decode to exactly " answer" plus the end token, nothing else.
        assert tok.decode(labels[mask == 1].tolist(), skip_special_tokens=False) == (
            " " + ex.answer + "<|im_end|>"
        )
        assert tok.decode(tokens[: mask.nonzero()[0].item() + 1].tolist()) == ex.prompt
        assert set(mask.tolist()) == {0.0, 1.0}
        assert batch["position_ids"][row].tolist() == list(range(width))


def test_collate_pad_to(tok):
    samples, _ = tokenize(EXAMPLES, tok, max_length=64)
    longest = max(s.length for s in samples) - 1
    assert collate(samples, tok.pad_id, pad_to=longest + 5)["tokens"].shape == (3, longest + 5)
    with pytest.raises(DataError, match=f"needs {longest} positions, longer than pad_to"):
        collate(samples, tok.pad_id, pad_to=longest - 1)
    with pytest.raises(DataError, match="empty batch"):
        collate([], tok.pad_id)


def test_chat_template_answer_ends_the_turn(tok):
    samples, _ = tokenize(EXAMPLES[:2], tok, template="chat", max_length=256)
    for ex, s in zip(EXAMPLES[:2], samples, strict=True):
        # Independent reference: the template rendering the whole conversation.
        turns = [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.answer},
        ]
        full = tok.chat(turns, add_generation_prompt=False)
        assert full[: s.length] == list(s.prompt_ids + s.answer_ids)


def test_tokenize_drops_long_examples(tok):
    lengths = [s.length for s in tokenize(EXAMPLES, tok, max_length=10_000)[0]]
    cut = sorted(lengths)[1]
    samples, dropped = tokenize(EXAMPLES, tok, max_length=cut)
    assert dropped == 1 and all(s.length <= cut for s in samples)
    assert [s.index for s in samples] == [i for i, n in enumerate(lengths) if n <= cut]
    with pytest.raises(DataError, match="need template='chat'"):
        tokenize([Example([{"role": "user", "content": "hi"}], "yo")], tok, max_length=64)


def test_collate_without_prompt_masks_from_the_second_token():
    batch = collate([Sample((), (5, 6, 7), 0), Sample((1, 2), (3,), 1)], pad_id=0)
    assert batch["tokens"].tolist() == [[5, 6], [1, 2]]
    assert batch["labels"].tolist() == [[6, 7], [2, 3]]
    assert batch["loss_mask"].tolist() == [[1.0, 1.0], [0.0, 1.0]]


# --- batch schedule --------------------------------------------------------------------------


def _epoch(schedule: BatchSchedule, epoch: int) -> list[list[int]]:
    first = epoch * schedule.steps_per_epoch
    return [schedule.global_batch_indices(first + k) for k in range(schedule.steps_per_epoch)]


@pytest.mark.parametrize("bucket", [False, True])
def test_schedule_covers_each_index_once(bucket):
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    full = BatchSchedule(lengths, 16, seed=3, bucket=bucket, drop_last=False)
    assert full.steps_per_epoch == math.ceil(1003 / 16)
    batches = _epoch(full, 0)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(len(b) for b in batches)[1:] == [16] * (len(batches) - 1)

    dropped = BatchSchedule(lengths, 16, seed=3, bucket=bucket)
    assert dropped.steps_per_epoch == 1003 // 16
    seen = [i for b in _epoch(dropped, 2) for i in b]
    assert len(seen) == len(set(seen)) == 1003 - 1003 % 16


def test_schedule_is_a_pure_function_of_seed_and_step():
    lengths = [(i * 13) % 50 + 1 for i in range(400)]
    a, b = BatchSchedule(lengths, 8, seed=7), BatchSchedule(lengths, 8, seed=7)
    steps = [0, 49, 50, 51, 137, 3, 0]  # any order, across epochs: no hidden sampler state
    assert [a.global_batch_indices(s) for s in steps] == [b.global_batch_indices(s) for s in steps]
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 0) != _epoch(BatchSchedule(lengths, 8, seed=8), 0)
    assert _epoch(BatchSchedule(lengths, 8, seed=0, shuffle=False, bucket=False), 0)[0] == list(
        range(8)
    )


def test_dp_shards_partition_the_global_batch():
    schedule = BatchSchedule(list(range(1, 101)), 12, seed=0, drop_last=False)
    for step in (0, 8):  # step 8 is the short last batch (100 = 8 * 12 + 4)
        shards = [schedule.local_indices(step, r, 3) for r in range(3)]
        assert sum(shards, []) == schedule.global_batch_indices(step)
    assert [len(schedule.local_indices(0, r, 4)) for r in range(4)] == [3, 3, 3, 3]
    with pytest.raises(DataError, match="not divisible by the data-parallel size 5"):
        schedule.local_indices(0, 0, 5)
    with pytest.raises(DataError, match="no global batch"):
        BatchSchedule([1, 2], 4, seed=0)


def test_buckets_reduce_padding():
    # Skewed lengths: mostly short, a long tail.
    gen = torch.Generator().manual_seed(0)
    lengths = (torch.empty(2000).exponential_(1 / 60, generator=gen).int() + 8).tolist()

    def padded(schedule: BatchSchedule) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in _epoch(schedule, 0))

    plain = padded(BatchSchedule(lengths, 8, seed=1, bucket=False))
    bucketed = padded(BatchSchedule(lengths, 8, seed=1))
    assert bucketed < 0.7 * plain
    assert bucketed >= sum(lengths[: 2000 // 8 * 8]) * 0.9  # sanity: cannot beat no padding


# --- JSONL -----------------------------------------------------------------------------------


def _write(tmp_path, *lines: str):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_jsonl_both_formats(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = _write(
        tmp_path,
        json.dumps({"input": "Q: 1+1?\nA:", "output": "2", "references": ["2", "two"]}),
        "",
        json.dumps({"messages": chat}),
    )
    plain, conv = load_jsonl(path)
    assert plain == Example("Q: 1+1?\nA:", "2", ("2", "two"))
    assert conv.prompt == chat[:1] and conv.answer == "Hello" and conv.references == ("Hello",)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (
            ['{"input": "a", "output": "b"}', '{"input": "a", "output": }'],
            r"data.jsonl:2: invalid JSON",
        ),
        (['{"input": "a"}'], r"data.jsonl:1: missing key 'output'"),
        (['{"input": "a", "output": "b", "label": 1}'], r":1: unknown key\(s\) \['label'\]"),
        (['{"input": "a", "output": "  "}'], r":1: empty output"),
        (
            ['{"messages": [{"role": "user", "content": "a"}]}'],
            r"last message must be the assistant",
        ),
        (['{"messages": [{"role": "bot", "content": "a"}]}'], r"message 0 needs a role"),
        (["[1, 2]"], r":1: expected a JSON object"),
    ],
)
def test_load_jsonl_errors(tmp_path, lines, match):
    with pytest.raises(DataError, match=match):
        load_jsonl(_write(tmp_path, *lines))


def _chat(*roles: str) -> str:
    return json.dumps({"messages": [{"role": r, "content": f"{r} text"} for r in roles]})


@pytest.mark.parametrize(
    ("roles", "match"),
    [
        (("assistant", "user", "assistant"), r":1: message 0 has role 'assistant' where 'user'"),
        (("user", "user", "assistant"), r":1: message 1 has role 'user' where 'assistant'"),
        (("system", "system", "user", "assistant"), r"message 1 has a second system message"),
        (("user", "assistant", "system", "assistant"), r"message 2 has a second system message"),
        (("system",), r":1: only a system message"),
        (("system", "user"), r"last message must be the assistant's answer \(message 1"),
    ],
)
def test_load_jsonl_checks_chat_role_order(tmp_path, roles, match):
    with pytest.raises(DataError, match=match):
        load_jsonl(_write(tmp_path, _chat(*roles)))
    ok = load_jsonl(_write(tmp_path, _chat("system", "user", "assistant", "user", "assistant")))
    assert ok[0].answer == "assistant text" and len(ok[0].prompt) == 4


def test_load_jsonl_names_file_line_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    good = b'{"input": "a", "output": "b"}\n'
    path.write_bytes(good + b'{"input": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid UTF-8 \(byte 0xe9 at column 15\)"):
        load_jsonl(path)
    # A truncated line: the column is where the line ends, not column 1 of the next line.
    path.write_bytes(good + good + b'{"input": "a", "output": "b"\n')
    with pytest.raises(DataError, match=r"data.jsonl:3: invalid JSON: .* \(column 29\)"):
        load_jsonl(path)
    path.write_bytes(b'{"input": "a", "output": }\n')
    with pytest.raises(DataError, match=r"data.jsonl:1: invalid JSON: .* \(column 26\)"):
        load_jsonl(path)
    path.write_bytes(b"\xef\xbb\xbf" + good)  # a UTF-8 byte-order mark is fine
    assert load_jsonl(path)[0].answer == "b"


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


# --- built-in tasks --------------------------------------------------------------------------


def _tiny_squad(tmp_path):
    articles = [
        {
            "title": f"Article_{a}",
            "paragraphs": [
                {
                    "context": f"Passage {a}.{p}",
                    "qas": [
                        {"question": f"Q{a}.{p}.{q}?", "answers": [{"text": f"A{q}"}] * 2}
                        for q in range(a + 1)
                    ],
                }
                for p in range(2)
            ],
        }
        for a in range(20)
    ]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": articles, "version": "1.1"}))
    return path


def test_squad_loader_on_a_small_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TIEDLORA_SQUAD_JSON", str(_tiny_squad(tmp_path)))
    splits = {s: squad(s) for s in ("train", "validation", "test")}
    # 20 articles: 2 each for validation and test; article a has 2 * (a + 1) questions.
    assert sum(len(v) for v in splits.values()) == sum(2 * (a + 1) for a in range(20))
    articles = {s: {ex.prompt.split(".")[0] for ex in v} for s, v in splits.items()}
    assert [len(a) for a in articles.values()] == [16, 2, 2]
    assert not set.intersection(*articles.values())
    ex = splits["test"][0]
    assert ex.prompt.startswith("Context: Passage ") and ex.prompt.endswith("?\nAnswer:")
    assert ex.references == ("A0",) and ex.answer == "A0"  # duplicate gold answers merged
    with pytest.raises(DataError, match="unknown split 'dev'"):
        squad("dev")


def test_squad_download_checks_sha256(tmp_path, monkeypatch):
    """A download whose bytes differ from the pinned sdist is refused, and nothing is cached."""
    monkeypatch.delenv("TIEDLORA_SQUAD_JSON", raising=False)
    fake = tmp_path / "served.tar.gz"
    fake.write_bytes(b"not the bigbench sdist")
    monkeypatch.setattr(tasks, "_sdist_url", lambda index: fake.as_uri())
    with pytest.raises(DataError, match="bigbench-1.0.0.tar.gz from .* has the wrong sha256"):
        squad("train", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "squaddev_v1.1.json").exists()


def test_squad_download_offline_names_the_fallbacks(tmp_path, monkeypatch):
    monkeypatch.delenv("TIEDLORA_SQUAD_JSON", raising=False)
    monkeypatch.setenv("TIEDLORA_PYPI_SIMPLE", "http://127.0.0.1:9/simple")  # nothing listens
    with pytest.raises(DataError, match=r"failed .*put bigbench-1.0.0.tar.gz \(sha256 "):
        squad("train", cache_dir=tmp_path)


def test_squad_split_by_article(monkeypatch):
    monkeypatch.delenv("TIEDLORA_SQUAD_JSON", raising=False)
    try:
        path = squad_json(download=False)
    except DataError as e:
        pytest.skip(
            f'{e}: fetch it once with `python -c "from tiedlora_megatron.data import squad; '
            f"squad('train')\"` (downloads the 358 MB bigbench sdist) or set "
            f"$TIEDLORA_SQUAD_JSON"
        )
    articles = json.loads(path.read_text())["data"]
    owner = {
        p["context"]: a["title"] for a in articles for p in a["paragraphs"]
    }  # each passage belongs to one article
    splits = {s: squad(s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 9083, "validation": 913, "test": 569}
    titles = {
        s: {owner[ex.prompt.split("\nQuestion: ")[0].removeprefix("Context: ")] for ex in v}
        for s, v in splits.items()
    }
    assert [len(t) for t in titles.values()] == [40, 4, 4]
    assert not (titles["train"] & titles["test"] or titles["train"] & titles["validation"])
    assert sorted(titles["test"]) == [
        "Genghis_Khan",
        "Geology",
        "Jacksonville,_Florida",
        "Private_school",
    ]
    first = splits["test"][0]
    assert first.answer == first.references[0] and first.prompt.endswith("\nAnswer:")


def test_gsm_split_by_template():
    pytest.importorskip("reasoning_gym")
    from tiedlora_megatron.data import gsm

    splits = {s: gsm(s) for s in ("validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"validation": 1082, "test": 1157}
    questions = [{ex.prompt for ex in v} for v in splits.values()]
    assert not questions[0] & questions[1]
    for ex in splits["test"][:50]:
        # The worked solution ends in "#### N" and N is the reference answer.
        assert numeric_accuracy(ex.answer.rsplit("####", 1)[1], ex.references[0]) == 1.0
