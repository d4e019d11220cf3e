"""The study's statistics against hand-computed cases: the sweep's widening rule, and paired
bootstrap intervals whose bounds are quantiles of a binomial worked out by hand."""

from __future__ import annotations

import math

import pytest

from examples.study.stats import (
    mean_interval,
    paired_bootstrap,
    seed_and_question_bootstrap,
    sweep_step,
)

GRID = (1e-3, 3e-3, 1e-2, 3e-2)


def test_an_edge_choice_widens_at_the_grid_spacing_until_the_limit() -> None:
    losses = {1e-3: 1.0, 3e-3: 1.1, 1e-2: 1.3, 3e-2: 1.6}
    step = sweep_step(losses, lower_is_better=True, base_grid=GRID)
    assert step.chosen is None and step.widen_to == pytest.approx(1e-3 / 3)
    losses[step.widen_to] = 0.9  # still the edge: one more
    step = sweep_step(losses, lower_is_better=True, base_grid=GRID)
    assert step.widen_to == pytest.approx(1e-3 / 9)
    losses[step.widen_to] = 0.8  # two added on that side: the limit
    step = sweep_step(losses, lower_is_better=True, base_grid=GRID, max_widenings=2)
    assert step.chosen == pytest.approx(1e-3 / 9) and step.at_limit and step.widen_to is None


def test_an_added_rate_that_is_worse_makes_the_old_edge_interior() -> None:
    losses = {1e-3: 1.0, 3e-3: 1.1, 1e-2: 1.3, 3e-2: 1.6, 1e-3 / 3: 1.05}
    step = sweep_step(losses, lower_is_better=True, base_grid=GRID)
    assert (step.chosen, step.at_limit, step.widen_to) == (1e-3, False, None)


def test_a_metric_on_the_high_edge_widens_upwards_and_a_diverged_run_ranks_last() -> None:
    em = {1e-3: 20.0, 3e-3: 25.0, 1e-2: 27.0, 3e-2: 30.0}
    assert sweep_step(em, lower_is_better=False, base_grid=GRID).widen_to == pytest.approx(9e-2)
    em[9e-2] = math.nan  # diverged: the best is 3e-2, interior now
    assert sweep_step(em, lower_is_better=False, base_grid=GRID).chosen == 3e-2
    interior = {1e-3: 20.0, 3e-3: 31.0, 1e-2: 27.0, 3e-2: 26.0}
    step = sweep_step(interior, lower_is_better=False, base_grid=GRID)
    assert step.chosen == 3e-3 and not step.at_limit


def test_sweep_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"base grid's rates \[0.03\] have no score"):
        sweep_step({1e-3: 1.0, 3e-3: 1.0, 1e-2: 1.0}, True, GRID)
    with pytest.raises(ValueError, match="every run of the sweep diverged"):
        sweep_step({lr: math.inf for lr in GRID}, True, GRID)
    with pytest.raises(ValueError, match="two rates or more"):
        sweep_step({1e-3: 1.0}, True, (1e-3,))


def test_paired_bootstrap_matches_the_binomial_quantiles() -> None:
    # Differences [1, 0, 0, 0]: a resample's mean is k/4 with k ~ Binomial(4, 1/4).
    # P(k = 0) = 81/256 = 0.316 >= 0.025, so the 2.5 % quantile is 0; P(k <= 2) = 243/256 = 0.949
    # < 0.975 <= P(k <= 3) = 255/256, so the 97.5 % quantile is 3/4. 0 is inside: a match.
    r = paired_bootstrap([1, 0, 0, 0], [0, 0, 0, 0], names=("vBuA", "LoRA"), seed=1)
    assert (r.mean, r.low, r.high, r.verdict) == (0.25, 0.0, 0.75, "match")
    # Differences [1, 1, 1, 0]: k ~ Binomial(4, 3/4); P(k = 0) = 1/256 < 0.025 <= P(k <= 1) =
    # 13/256, so the 2.5 % quantile is 1/4, and the 97.5 % quantile is 1: vBuA ahead.
    r = paired_bootstrap([1, 1, 1, 0], [0, 0, 0, 0], names=("vBuA", "LoRA"), seed=2)
    assert (r.mean, r.low, r.high, r.verdict) == (0.75, 0.25, 1.0, "vBuA ahead")
    r = paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 0], names=("vBuA", "LoRA"), seed=2)
    assert (r.low, r.high, r.verdict) == (-1.0, -0.25, "LoRA ahead")


def test_paired_bootstrap_pairs_the_questions() -> None:
    # Per question both methods move together (+-50 points), b always 1 point lower: unpaired, the
    # spread would swamp the 1-point gap; paired, every difference is exactly 1.
    a = [50.0 + (i % 2) * 50 for i in range(40)]
    b = [x - 1 for x in a]
    r = paired_bootstrap(a, b)
    assert (r.mean, r.low, r.high, r.verdict) == (1.0, 1.0, 1.0, "a ahead")


def test_paired_bootstrap_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="same questions: 2 vs 3"):
        paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no questions"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="level must lie in"):
        paired_bootstrap([1], [0], level=1.5)


def test_seed_and_question_bootstrap_with_one_seed_gives_the_binomial_quantiles() -> None:
    # As in test_paired_bootstrap_matches_the_binomial_quantiles: k ~ Binomial(4, 3/4).
    r = seed_and_question_bootstrap([[1, 1, 1, 0]], [[0, 0, 0, 0]], names=("vBuA", "LoRA"))
    assert (r.mean, r.low, r.high, r.verdict) == (0.75, 0.25, 1.0, "vBuA ahead")
    # Two seeds that agree question by question: the same distribution.
    r = seed_and_question_bootstrap([[1, 1, 1, 0]] * 2, [[0, 0, 0, 0]] * 2, seed=3)
    assert (r.low, r.high) == (0.25, 1.0)


def test_seed_and_question_bootstrap_covers_the_seed_spread() -> None:
    # Seed 0 of both methods agree on every question, seed 1 differs by 1 on every question: a
    # resample's mean is j/2 with j ~ Binomial(2, 1/2) the draws of seed 1, so the 2.5 % and
    # 97.5 % quantiles are 0 and 1: a match. Averaging the seeds first would give a constant
    # difference of 1/2 on every question, and a verdict the next seed could overturn.
    a = [[0.0] * 10, [1.0] * 10]
    b = [[0.0] * 10, [0.0] * 10]
    r = seed_and_question_bootstrap(a, b, names=("vBuA", "LoRA"))
    assert (r.mean, r.low, r.high, r.verdict) == (0.5, 0.0, 1.0, "match")
    seed_mean = [[0.5] * 10]
    r = seed_and_question_bootstrap(seed_mean, [[0.0] * 10], names=("vBuA", "LoRA"))
    assert (r.low, r.high, r.verdict) == (0.5, 0.5, "vBuA ahead")
    assert mean_interval([[2.0, 4.0]] * 3) == (3.0, 2.0, 4.0)


def test_seed_and_question_bootstrap_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="same seeds: 1 vs 2 runs"):
        seed_and_question_bootstrap([[1.0]], [[1.0], [0.0]])
    with pytest.raises(ValueError, match="each of the same questions"):
        seed_and_question_bootstrap([[1.0, 0.0]], [[1.0]])
