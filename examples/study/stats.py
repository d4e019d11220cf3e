"""The study's statistics: the learning-rate sweep's widening rule and paired bootstrap intervals.

A sweep whose best learning rate sits on its edge has not found the method's best: the optimum may
lie beyond it. `sweep_step` says whether to widen (one more rate past that edge, at the grid's own
geometric spacing) or that the choice is made, flagged when the widening limit stopped it.

Two methods scored on the same questions are compared per question: `paired_bootstrap` resamples
the questions (the same draw for both methods) and gives the mean difference with a percentile
interval, and the verdict at that level: "match" when the interval contains 0. With several
seeds per method (seed s of both sharing its data order), `seed_and_question_bootstrap`
resamples the seeds too, so that the interval also covers how much a rerun moves the result.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SweepStep:
    """What the sweep does next: `widen_to` a new rate, or `chosen` (None while widening);
    `at_limit` when the chosen rate is still on an edge because the widening limit was reached."""

    chosen: float | None = None
    widen_to: float | None = None
    at_limit: bool = False


def sweep_step(
    scores: Mapping[float, float],
    lower_is_better: bool,
    base_grid: Sequence[float],
    max_widenings: int = 2,
) -> SweepStep:
    """The next step of a sweep that started at `base_grid` and has `scores` so far (every rate
    run, the base grid's and any added). A non-finite score (a diverged run) ranks last. The best
    rate is interior: chosen. On the low (high) edge: widen by the ratio of the base grid's two
    lowest (highest) rates, unless `max_widenings` rates were already added on that side."""
    grid = sorted(base_grid)
    if len(grid) < 2:
        raise ValueError(f"a sweep needs two rates or more to widen, got {list(base_grid)}")
    missing = [lr for lr in grid if lr not in scores]
    if missing:
        raise ValueError(f"the base grid's rates {missing} have no score yet")
    rates = sorted(scores)
    sign = 1.0 if lower_is_better else -1.0

    def badness(lr: float) -> float:
        value = sign * scores[lr]
        return value if math.isfinite(value) else math.inf

    best = min(rates, key=badness)
    if not math.isfinite(badness(best)):
        raise ValueError("every run of the sweep diverged: no rate to choose or widen from")
    if best == rates[0]:
        added, ratio = sum(lr < grid[0] for lr in rates), grid[1] / grid[0]
        if added < max_widenings:
            return SweepStep(widen_to=rates[0] / ratio)
        return SweepStep(chosen=best, at_limit=True)
    if best == rates[-1]:
        added, ratio = sum(lr > grid[-1] for lr in rates), grid[-1] / grid[-2]
        if added < max_widenings:
            return SweepStep(widen_to=rates[-1] * ratio)
        return SweepStep(chosen=best, at_limit=True)
    return SweepStep(chosen=best)


@dataclass(frozen=True)
class PairedComparison:
    """Mean of `a - b` per question, its bootstrap percentile interval at `level`, the verdict."""

    mean: float
    low: float
    high: float
    level: float
    verdict: str


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    names: tuple[str, str] = ("a", "b"),
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Compare per-question scores `a` and `b` of the same questions (in the same order): each
    resample draws the questions with replacement, once for both methods. The verdict is "match"
    when the interval contains 0, else "<name> ahead" for the method it favours."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: {len(a)} vs {len(b)} scores")
    if not a:
        raise ValueError("no questions to compare")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    diff = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diff)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diff, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[int(math.floor(tail * (resamples - 1)))]
    high = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    verdict = "match" if low <= 0 <= high else f"{names[0] if low > 0 else names[1]} ahead"
    return PairedComparison(sum(diff) / n, low, high, level, verdict)


def seed_and_question_bootstrap(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    names: tuple[str, str] = ("a", "b"),
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Compare two methods run with the same seeds on the same questions: `a[s][q]` is the score
    of seed s on question q (seed s of both methods shares its data order). Each resample draws
    the seeds and the questions with replacement, the same draws for both methods, and takes
    the mean of `a - b` over them: the interval covers the seed-to-seed spread as well as the
    choice of questions. With one seed it is the question bootstrap of `paired_bootstrap`
    (quantiles interpolated, another generator)."""
    import torch

    if len(a) != len(b) or not a:
        raise ValueError(f"paired runs need the same seeds: {len(a)} vs {len(b)} runs")
    if any(len(row) != len(a[0]) for row in (*a, *b)) or not a[0]:
        raise ValueError("every run needs a score for each of the same questions")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    seeds, questions = diff.shape
    g = torch.Generator().manual_seed(seed)

    def counts(n: int) -> torch.Tensor:  # [resamples, n]: how often each index is drawn
        draws = torch.randint(n, (resamples, n), generator=g)
        return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.float64)
        )

    per_question = counts(seeds) @ diff  # [resamples, questions]: sums over the drawn seeds
    means = (per_question * counts(questions)).sum(1) / (seeds * questions)
    tail = (1 - level) / 2
    low, high = (float(x) for x in torch.quantile(means, torch.tensor([tail, 1 - tail]).double()))
    verdict = "match" if low <= 0 <= high else f"{names[0] if low > 0 else names[1]} ahead"
    return PairedComparison(float(diff.mean()), low, high, level, verdict)


def mean_interval(
    scores: Sequence[Sequence[float]], resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high) of one method's per-question scores `scores[s][q]` over its seeds and
    questions, the interval from resampling both, as `seed_and_question_bootstrap` does."""
    zeros = [[0.0] * len(row) for row in scores]
    c = seed_and_question_bootstrap(scores, zeros, resamples=resamples, level=level, seed=seed)
    return c.mean, c.low, c.high
