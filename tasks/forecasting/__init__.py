"""Time-series forecasting with anomaly injection (Stable-SPAM / SPAM), on neuralforecast.

Modules: `config` (schema, presets, the epoch definition), `data` (Weather loader, fallback data, split and
scaling), `anomalies` (the injection), `models` (neuralforecast models with the registry's optimizer),
`training` (one trial: curves, test scores) and `task` (`ForecastingTask`, the adapter the harness loads).
Importing this package is cheap; neuralforecast and Lightning load when a trial runs.
"""

from tasks.forecasting.config import PRESETS, ForecastingConfig
from tasks.forecasting.task import ForecastingTask

__all__ = ["PRESETS", "ForecastingConfig", "ForecastingTask"]
