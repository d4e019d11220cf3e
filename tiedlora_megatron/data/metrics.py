"""Task metrics: SQuAD exact match and F1 (the official v1.1 normalisation), and the final-number
accuracy used for GSM-style math. `score` reports a task's metrics as percentages,
`score_metrics` a named set's (`METRIC_SETS`: what `eval --metric` chooses), and `clean_answer`
turns a generated continuation into the answer that is scored."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

from tiedlora_megatron.data.sft import DataError
from tiedlora_megatron.data.tasks import get_task

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")
# "Answer:", "The answer is:", "The final answer is", "Answer is", "A:" at the start of a line,
# any case. "A" needs its colon and a space after it ("A:b" stays); "answer is" needs a space or
# colon after "is" ("The answer isn't known" stays).
_PREAMBLE = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+|correct\s+|short\s+)?answer(?:\s*:|\s+is(?=\s|:|$)\s*:?)"
    r"|a:(?=\s|$))\s*",
    re.IGNORECASE,
)

#: What `tiedlora-finetune eval --metric` (`eval.metric`) names: the metrics reported, all on
#: short answers cleaned by `clean_answer(text, short=True)`.
METRIC_SETS: dict[str, tuple[str, ...]] = {
    "squad": ("exact_match", "f1"),
    "exact": ("exact_match",),
    "number": ("accuracy",),
}


def strip_preamble(line: str) -> str:
    """`line` without a leading "Answer:" / "The answer is" / "A:" (repeated ones too)."""
    line = line.strip()
    for _ in range(3):
        stripped = _PREAMBLE.sub("", line, count=1).strip()
        if stripped == line:
            break
        line = stripped
    return line


def clean_answer(text: str, short: bool) -> str:
    """The answer in a generated continuation.

    A short answer (SQuAD, `--metric squad|exact|number`) is the first non-empty line with a
    leading "Answer:", "The answer is", "Final answer:" or "A:" (any case) removed; a line that
    is only such a preamble is skipped, so "Answer:\nParis" gives "Paris". Base models often
    start with a line break or restate the cue, which would otherwise score zero. Anything else
    ("Answers vary", "A. Lincoln", "The answer") is kept as it is. A long answer (gsm's worked
    solutions) is only stripped of surrounding whitespace.
    """
    if not short:
        return text.strip()
    for line in text.splitlines():
        if line.strip() and (answer := strip_preamble(line)):
            return answer
    return ""


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def _token_f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: Sequence[str]) -> float:
    """Best token-overlap F1 of the prediction against any reference."""
    return max(_token_f1(prediction, r) for r in references)


def _parse_number(text: str) -> Decimal | None:
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    return Decimal(found[-1]) if found else None


def numeric_accuracy(prediction: str, reference: str) -> float:
    """1.0 when the last number in the prediction (thousands commas ignored) equals the
    reference's; "8.0" equals "8"."""
    try:
        gold = Decimal(_THOUSANDS.sub("", reference.strip()))
    except InvalidOperation:
        raise DataError(f"reference {reference!r} is not a number") from None
    return float(_parse_number(prediction) == gold)


_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "f1": f1,
    "accuracy": lambda p, refs: max(numeric_accuracy(p, r) for r in refs),
}


def example_scores(
    names: Sequence[str], prediction: str, references: Sequence[str]
) -> dict[str, float]:
    """One prediction's metrics `names`, each in [0, 1] (what `score_metrics` averages)."""
    if not references:
        raise DataError("every prediction needs at least one reference")
    return {name: _METRICS[name](prediction, references) for name in names}


def score(
    task_name: str, predictions: Sequence[str], references_list: Sequence[Sequence[str]]
) -> dict[str, float]:
    """The task's metrics in percent (0-100), averaged over examples."""
    return score_metrics(get_task(task_name).metrics, predictions, references_list)


def score_metrics(
    names: Sequence[str], predictions: Sequence[str], references_list: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Metrics `names` (keys of the metric table: exact_match, f1, accuracy) in percent (0-100),
    averaged over examples."""
    unknown = [n for n in names if n not in _METRICS]
    if unknown:
        raise DataError(f"unknown metric(s) {unknown}; known: {sorted(_METRICS)}")
    if len(predictions) != len(references_list):
        raise DataError(
            f"{len(predictions)} predictions for {len(references_list)} reference lists"
        )
    if not predictions:
        raise DataError("no predictions to score")
    if any(not refs for refs in references_list):
        raise DataError("every prediction needs at least one reference")
    return {
        name: 100.0
        * sum(_METRICS[name](p, refs) for p, refs in zip(predictions, references_list, strict=True))
        / len(predictions)
        for name in names
    }
