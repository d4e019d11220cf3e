"""Task metrics: SQuAD exact match and F1 (the official v1.1 normalisation), and the final-number
accuracy used for GSM-style math. `score` reports a task's metrics as percentages."""

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


def score(
    task_name: str, predictions: Sequence[str], references_list: Sequence[Sequence[str]]
) -> dict[str, float]:
    """The task's metrics in percent (0-100), averaged over examples."""
    names = get_task(task_name).metrics
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
