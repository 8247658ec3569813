"""Interquartile mean and stratified-bootstrap confidence intervals, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.summary import bootstrap_ci, iqm, summarise


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([5.0], 5.0),
        ([1, 2, 3, 100], 2.5),  # n=4: drop 1 at each end -> mean(2, 3)
        ([1, 2, 3, 4, 100], 3.0),  # n=5: int(1.25)=1 at each end -> mean(2, 3, 4)
        ([8, 1, 7, 2, 6, 3, 5, 4], 4.5),  # sorted 1..8: drop 2 at each end -> mean(3, 4, 5, 6)
        ([[1, 2], [3, 100]], 2.5),  # 2-D scores are pooled
        ([-1000, 0, 1, 2, 3, 4, 5, 1e9], 2.5),  # outliers do not move it
    ],
)
def test_iqm_by_hand(values: list, expected: float) -> None:
    assert iqm(values) == pytest.approx(expected)


def test_iqm_matches_scipy_trim_mean() -> None:
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(1).normal(size=37)
    assert iqm(x) == pytest.approx(stats.trim_mean(x, 0.25))


def test_iqm_rejects_empty() -> None:
    with pytest.raises(ValueError):
        iqm([])


def test_bootstrap_of_constant_scores_is_a_point() -> None:
    assert bootstrap_ci([3.0, 3.0, 3.0, 3.0]) == (3.0, 3.0)


def test_bootstrap_two_runs_by_hand() -> None:
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 5th percentile is 0 and the
    # 95th is 1.
    assert bootstrap_ci([0.0, 1.0], statistic=np.mean, confidence=0.9) == (0.0, 1.0)


def test_bootstrap_three_runs_by_hand() -> None:
    # Means of resamples of [0, 0, 3] equal k = the number of 3s drawn, k ~ Binomial(3, 1/3):
    # P(k<=0) = 8/27 = 0.30, P(k<=1) = 20/27 = 0.74, P(k<=2) = 26/27 = 0.963.
    # 80% interval: 10th percentile 0, 90th percentile 2; 95% interval: 2.5th percentile 0, 97.5th percentile 3.
    assert bootstrap_ci([0.0, 0.0, 3.0], statistic=np.mean, confidence=0.8) == (0.0, 2.0)
    assert bootstrap_ci([0.0, 0.0, 3.0], statistic=np.mean, confidence=0.95) == (0.0, 3.0)


def test_bootstrap_is_stratified_over_tasks() -> None:
    # Runs x tasks: task 0 always scores 0, task 1 always 10. Resampling runs within each task keeps one score per
    # run and task, so every resample has mean 5 (pooled resampling would not).
    scores = np.array([[0.0, 10.0]] * 5)
    assert bootstrap_ci(scores, statistic=np.mean) == (5.0, 5.0)
    shapes = set()
    bootstrap_ci(scores, statistic=lambda a: shapes.add(a.shape) or 0.0, n_boot=10)
    assert shapes == {(5, 2)}


def test_bootstrap_interval_contains_estimate_and_is_seeded() -> None:
    x = np.random.default_rng(0).normal(1000.0, 300.0, size=10)
    low, high = bootstrap_ci(x)
    assert low < iqm(x) < high
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    wide, narrow = bootstrap_ci(x, confidence=0.99), bootstrap_ci(x, confidence=0.5)
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]


@pytest.mark.parametrize("kwargs", [{"confidence": 1.0}, {"confidence": 0.0}, {"n_boot": 0}])
def test_bootstrap_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], **kwargs)
    with pytest.raises(ValueError):
        bootstrap_ci(np.zeros((2, 2, 2)))


def test_summarise_follows_the_tasks_declared_summary():
    import tasks

    assert tasks.get_task("rl").summary == "iqm" and tasks.get_task("llm_pretrain").summary == "mean"
    mean = summarise("mean", [1.0, 2.0, 6.0])
    assert mean is not None and mean.center == 3.0 and mean.std == pytest.approx(2.6458, abs=1e-4)
    robust = summarise("iqm", [1.0, 2.0, 3.0, 100.0])
    assert robust is not None and robust.center == 2.5 and robust.interval == bootstrap_ci([1.0, 2.0, 3.0, 100.0])
    assert summarise("iqm", []) is None and summarise("mean", [4.0]) == type(mean)(4.0)
