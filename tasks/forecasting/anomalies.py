"""Anomaly injection for the forecasting task, as in the Stable-SPAM time-series experiment.

A seeded random `fraction` of the values of each series inside the training rows gets

    x <- x + N(0, (S * max x)^2)

where S is the severity (`scale`) and `max x` is the maximum of that series over the training rows, computed
before any noise is added (on whatever array is passed in: the task passes the standardized series by default,
see `ForecastingConfig.noise_space`). Only the sign-free value |S * max x| matters, as it is a standard deviation.

The positions are drawn without replacement, exactly `round(fraction * train_rows)` of them in each series, so
every series carries the requested fraction. Rows at and after `train_rows` (validation and test) are never
touched, and the input array is never modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Injection:
    """The result of `inject_anomalies`: the corrupted copy and what was done to it."""

    values: np.ndarray  # [time, series], a new array
    mask: np.ndarray  # [time, series] bool, True where a value was selected for noise
    sigma: np.ndarray  # [series], the noise standard deviation used in each series: |scale * max x|


def anomaly_sigma(train_values: np.ndarray, scale: float) -> np.ndarray:
    """Per-series noise standard deviation |scale * max x| over the given training rows ([time, series])."""
    if train_values.ndim != 2 or train_values.shape[0] == 0:
        raise ValueError(f"expected a non-empty [time, series] array, got shape {train_values.shape}")
    return np.abs(scale * np.nanmax(train_values, axis=0)).astype(np.float64)


def inject_anomalies(
    values: np.ndarray,
    *,
    scale: float,
    fraction: float,
    train_rows: int,
    seed: int | np.random.Generator,
) -> Injection:
    """Add N(0, (scale * max x)^2) noise to a seeded `fraction` of each series' values in rows [0, train_rows).

    `values` is [time, series]. With `scale == 0` or `fraction == 0` the values are returned unchanged (the mask
    still marks the positions that would have been drawn for a non-zero scale).
    """
    if values.ndim != 2:
        raise ValueError(f"expected a [time, series] array, got shape {values.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    if not 0 < train_rows <= values.shape[0]:
        raise ValueError(f"train_rows must be in [1, {values.shape[0]}], got {train_rows}")

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n_series = values.shape[1]
    out = np.array(values, dtype=np.float64, copy=True)
    mask = np.zeros(values.shape, dtype=bool)
    sigma = anomaly_sigma(out[:train_rows], scale)
    per_series = int(round(fraction * train_rows))

    for j in range(n_series):
        # Positions and noise are drawn for every series, whatever the scale, so that the same seed selects the
        # same positions at every severity S.
        rows = rng.choice(train_rows, size=per_series, replace=False)
        noise = rng.standard_normal(per_series)
        mask[rows, j] = True
        if sigma[j] > 0:
            out[rows, j] += sigma[j] * noise
    return Injection(values=out, mask=mask, sigma=sigma)
