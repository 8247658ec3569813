"""How a task's final metric is summarised over runs (seeds): the mean with its standard deviation, or, for noisy
scores such as RL returns, the way rliable does it (Agarwal et al., 2021, "Deep RL at the Edge of the
Statistical Precipice"): the interquartile mean (IQM) as the point estimate, and a percentile confidence interval
from a stratified bootstrap over runs.

Scores are a 1-D array (one value per run, e.g. the final test return of each seed) or a 2-D array of shape
(runs, tasks). The stratified bootstrap resamples runs with replacement separately within each task (column), so
every resample keeps one score per run and task; the statistic is then computed on the resampled array.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Scores = Sequence[float] | Sequence[Sequence[float]] | np.ndarray
# "mean": mean ± standard deviation over seeds; "iqm": interquartile mean with a 95% stratified-bootstrap interval.
SummaryKind = Literal["mean", "iqm"]


@dataclass(frozen=True)
class Summary:
    """A cell's point estimate and its spread: the standard deviation (mean) or a confidence interval (iqm)."""

    center: float
    std: float | None = None
    interval: tuple[float, float] | None = None


def summarise(kind: SummaryKind, values: Sequence[float]) -> Summary | None:
    """The summary of one cell's values (None without values; no spread below two values)."""
    if not values:
        return None
    if kind == "iqm":
        return Summary(iqm(values), interval=bootstrap_ci(values) if len(values) >= 2 else None)
    return Summary(statistics.fmean(values), std=statistics.stdev(values) if len(values) >= 2 else None)


def iqm(values: Scores) -> float:
    """Interquartile mean: the mean of the middle 50% of all scores.

    Like `scipy.stats.trim_mean(x, 0.25)` (which rliable uses): sort, drop `int(0.25 * n)` scores at each end, and
    average the rest. Scores of a 2-D array are pooled over runs and tasks.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0:
        raise ValueError("iqm of no values")
    cut = int(0.25 * x.size)
    return float(x[cut:x.size - cut].mean())


def bootstrap_ci(
    values: Scores,
    statistic: Callable[[np.ndarray], float] = iqm,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile confidence interval (low, high) of `statistic` by stratified bootstrap over runs.

    `values` is 1-D (runs) or 2-D (runs x tasks); each of `n_boot` resamples draws, for every task independently, as
    many runs as there are with replacement. The interval is the ((1 - confidence) / 2, (1 + confidence) / 2)
    percentiles of the resampled statistics (linear interpolation, as numpy's default). Deterministic for a seed.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty 1-D (runs) or 2-D (runs x tasks) array, got shape {x.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    rng = np.random.default_rng(seed)
    table = x.reshape(x.shape[0], -1)
    runs, tasks = table.shape
    stats = np.empty(n_boot)
    columns = np.arange(tasks)
    for b in range(n_boot):
        rows = rng.integers(0, runs, size=(runs, tasks))  # per task (column), runs drawn with replacement
        stats[b] = statistic(table[rows, columns].reshape(x.shape))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)
