"""Forecasting data: the Weather CSV loader, the offline fallback and its message, split, scaling, injection."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.forecasting.data import (
    WEATHER_ENV,
    DataUnavailable,
    Scaler,
    chronological_split,
    load_fallback,
    load_series,
    prepare,
    read_csv_table,
)


@pytest.fixture(scope="module")
def vic_elec_wide() -> pd.DataFrame:
    """A real sample in the long-horizon layout: `date` + one column per variable."""
    table = load_fallback("vic_elec")
    dates = pd.date_range("2012-01-01", periods=800, freq="30min").strftime("%Y-%m-%d %H:%M:%S")
    return pd.DataFrame({"date": dates, **{n: table.values[:800, j] for j, n in enumerate(table.names)}})


@pytest.fixture(autouse=True)
def _no_weather_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEATHER_ENV, raising=False)


def test_split_matches_the_long_horizon_benchmarks() -> None:
    # weather.csv has 52,696 rows: 36,887 train / 5,270 validation / 10,539 test in the benchmark loaders.
    s = chronological_split(52_696)
    assert (s.train, s.val, s.test) == (36_887, 5_270, 10_539)


def test_fallback_series_are_real_and_shaped_as_documented() -> None:
    vic = load_fallback("vic_elec")
    assert vic.values.shape == (52_602, 2) and vic.names == ["Demand", "Temperature"]
    assert vic.source == "fallback:vic_elec"
    assert 2_800 < vic.values[:, 0].mean() < 6_000 and np.isfinite(vic.values).all()  # MW, half-hourly
    epf = load_fallback("epf_fr_be")
    assert epf.values.shape == (16_080, 6)
    assert sorted(epf.names) == [
        "BE_gen_forecast",
        "BE_system_load",
        "BE_y",
        "FR_gen_forecast",
        "FR_system_load",
        "FR_y",
    ]


def test_weather_layout_csv_is_read(tmp_path: Path, vic_elec_wide: pd.DataFrame) -> None:
    path = tmp_path / "weather.csv"
    vic_elec_wide.to_csv(path, index=False)
    table = read_csv_table(path)
    assert table.names == ["Demand", "Temperature"] and table.values.shape == (800, 2)
    np.testing.assert_allclose(table.values, vic_elec_wide[["Demand", "Temperature"]].to_numpy())
    assert table.source == f"weather:{path}"
    long = vic_elec_wide.melt(id_vars="date", var_name="unique_id", value_name="y").rename(columns={"date": "ds"})
    long.to_csv(tmp_path / "long.csv", index=False)
    np.testing.assert_allclose(read_csv_table(tmp_path / "long.csv").values, table.values)


def test_local_path_and_environment_variable_come_first(
    tmp_path: Path, vic_elec_wide: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "weather.csv"
    vic_elec_wide.to_csv(path, index=False)
    assert load_series(str(path), None, 1.0, "vic_elec").source == f"weather:{path}"
    monkeypatch.setenv(WEATHER_ENV, str(path))
    assert load_series(None, None, 1.0, "epf_fr_be").source == f"weather:{path}"


def test_fallback_is_announced(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with caplog.at_level(logging.WARNING, logger="tasks.forecasting.data"):
        table = load_series(str(tmp_path / "missing.csv"), None, 1.0, "vic_elec")
    assert table.source == "fallback:vic_elec"
    message = caplog.text
    assert "FALLING BACK" in message and "missing.csv" in message and "vic_elec" in message


def test_unreachable_url_falls_back_quickly(caplog: pytest.LogCaptureFixture) -> None:
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tasks.forecasting.data"):
        table = load_series(None, "http://127.0.0.1:9/weather.csv", 1.0, "vic_elec")
    assert time.monotonic() - t0 < 15
    assert table.source == "fallback:vic_elec"
    assert "127.0.0.1:9" in caplog.text


def test_no_fallback_when_refused(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable, match="missing.csv"):
        load_series(str(tmp_path / "missing.csv"), None, 1.0, "vic_elec", allow_fallback=False)


def test_prepare_scales_on_clean_training_rows_and_injects_there_only() -> None:
    table = load_fallback("epf_fr_be")
    kwargs = {"max_rows": 2000, "series": None, "train_fraction": 0.7, "test_fraction": 0.2, "noise_fraction": 0.1}
    data = prepare(table, noise_scale=5.0, noise_space="scaled", noise_seed=3, **kwargs)
    s = data.split
    assert (s.train, s.val, s.test) == (1400, 200, 400)
    np.testing.assert_allclose(data.clean[: s.train].mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(data.clean[: s.train].std(axis=0), 1.0, atol=1e-9)
    np.testing.assert_array_equal(data.noisy[s.train :], data.clean[s.train :])
    assert data.mask[: s.train].sum(axis=0).tolist() == [140] * 6 and not data.mask[s.train :].any()
    np.testing.assert_allclose(data.sigma, 5.0 * data.clean[: s.train].max(axis=0))

    raw = prepare(table, noise_scale=5.0, noise_space="raw", noise_seed=3, **kwargs)
    np.testing.assert_array_equal(raw.clean, data.clean)
    np.testing.assert_array_equal(raw.mask, data.mask)
    np.testing.assert_array_equal(raw.noisy[s.train :], data.clean[s.train :])
    np.testing.assert_allclose(raw.sigma, np.abs(5.0 * table.values[: s.train].max(axis=0)))


def test_series_subset_and_scaler_roundtrip() -> None:
    table = load_fallback("epf_fr_be")
    data = prepare(
        table,
        max_rows=500,
        series=["FR_y", "BE_y"],
        train_fraction=0.7,
        test_fraction=0.2,
        noise_scale=0.0,
        noise_fraction=0.1,
        noise_space="scaled",
        noise_seed=0,
    )
    assert data.table.names == ["FR_y", "BE_y"]
    np.testing.assert_array_equal(data.noisy, data.clean)
    np.testing.assert_allclose(data.scaler.inverse(data.clean), data.table.values)
    with pytest.raises(ValueError, match="not in the data"):
        prepare(
            table,
            max_rows=500,
            series=["nope"],
            train_fraction=0.7,
            test_fraction=0.2,
            noise_scale=0.0,
            noise_fraction=0.1,
            noise_space="scaled",
            noise_seed=0,
        )


def test_scaler_guards_constant_series() -> None:
    scaler = Scaler.fit(np.ones((10, 1)))
    assert scaler.std.tolist() == [1.0]
