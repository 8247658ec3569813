"""Anomaly injection: fraction, scale, seeding, and the rows it may touch."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.forecasting.anomalies import anomaly_sigma, inject_anomalies


@pytest.fixture(scope="module")
def series() -> np.ndarray:
    """A large [time, series] array with different levels and spreads per series."""
    rng = np.random.default_rng(123)
    return rng.normal(loc=[0.0, 5.0, -3.0], scale=[1.0, 2.0, 0.5], size=(200_000, 3))


def test_fraction_is_exact_per_series_and_only_in_training_rows(series: np.ndarray) -> None:
    train = 140_000
    inj = inject_anomalies(series, scale=2.0, fraction=0.1, train_rows=train, seed=0)
    assert inj.mask[:train].sum(axis=0).tolist() == [14_000] * 3
    assert not inj.mask[train:].any()
    np.testing.assert_array_equal(inj.values[train:], series[train:])
    np.testing.assert_array_equal(inj.values[~inj.mask], series[~inj.mask])
    assert (inj.values[inj.mask] != series[inj.mask]).all()


def test_noise_is_gaussian_with_the_requested_scale(series: np.ndarray) -> None:
    train, scale = 140_000, 5.0
    inj = inject_anomalies(series, scale=scale, fraction=0.1, train_rows=train, seed=1)
    expected_sigma = np.abs(scale * series[:train].max(axis=0))
    np.testing.assert_allclose(inj.sigma, expected_sigma)
    for j in range(series.shape[1]):
        z = (inj.values[inj.mask[:, j], j] - series[inj.mask[:, j], j]) / expected_sigma[j]
        assert abs(z.mean()) < 0.03  # 14,000 draws: standard error ~0.0085
        assert abs(z.std() - 1.0) < 0.03
        assert abs(np.mean(np.abs(z) > 1.959964) - 0.05) < 0.008  # two-sided 5% tail of a standard normal


def test_max_is_taken_over_the_training_rows_only() -> None:
    values = np.zeros((100, 1))
    values[10, 0] = 2.0
    values[90, 0] = 50.0  # outside the training rows: must not set the scale
    inj = inject_anomalies(values, scale=3.0, fraction=0.5, train_rows=60, seed=0)
    assert inj.sigma.tolist() == [6.0]
    assert anomaly_sigma(values[:60], 3.0).tolist() == [6.0]


def test_seeded_repeatability_and_common_positions_across_scales(series: np.ndarray) -> None:
    small = series[:5000]
    a = inject_anomalies(small, scale=2.0, fraction=0.1, train_rows=3500, seed=7)
    b = inject_anomalies(small, scale=2.0, fraction=0.1, train_rows=3500, seed=7)
    c = inject_anomalies(small, scale=2.0, fraction=0.1, train_rows=3500, seed=8)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)
    # The same seed hits the same positions with the same standard-normal draws at every severity.
    d = inject_anomalies(small, scale=5.0, fraction=0.1, train_rows=3500, seed=7)
    np.testing.assert_array_equal(a.mask, d.mask)
    np.testing.assert_allclose((d.values - small) / d.sigma, (a.values - small) / a.sigma, atol=1e-9)


def test_zero_scale_leaves_values_unchanged_and_input_is_not_modified(series: np.ndarray) -> None:
    small = series[:1000].copy()
    before = small.copy()
    inj = inject_anomalies(small, scale=0.0, fraction=0.1, train_rows=700, seed=0)
    np.testing.assert_array_equal(inj.values, before)
    inject_anomalies(small, scale=5.0, fraction=0.1, train_rows=700, seed=0)
    np.testing.assert_array_equal(small, before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": -1.0, "fraction": 0.1, "train_rows": 10},
        {"scale": 1.0, "fraction": 1.5, "train_rows": 10},
        {"scale": 1.0, "fraction": 0.1, "train_rows": 0},
        {"scale": 1.0, "fraction": 0.1, "train_rows": 101},
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        inject_anomalies(np.ones((100, 2)), seed=0, **kwargs)
