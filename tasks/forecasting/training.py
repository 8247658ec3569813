"""Training and evaluation of one forecasting trial on neuralforecast.

The model trains on the series with anomalies in their training rows, where every value serves as a lookback
input of some windows and as a target of others. Validation runs at the end of every epoch on the same series:
its targets are clean, but the lookback of its first windows reaches into the training rows and may hold
anomalies. Test windows are predicted from the clean series, inputs and targets alike, and scored on the
standardized scale (the long-horizon benchmarks' convention): MSE and MAE averaged over every test window
(stride `test_step_size`), horizon step and series.

Per-epoch curves come from a Lightning callback given to neuralforecast's trainer: mean training loss of the
epoch, validation loss, learning rate and (with `test_every_epoch`) test MSE/MAE, reported at step = epoch.
The optimizer's resolved hyperparameters are logged when training starts. Where the hyperparameters are silent,
the task fills `total_steps` (Stable-SPAM's schedule length: the trial's optimizer steps) and `seed` (SPAM's
sparse-momentum draws: the trial seed), and tags what it filled (`task_filled_hparams`). Test predictions during
training run on a second instance of the model that receives a copy of the weights, under a forked RNG, so they
change nothing in the training run.

Trials are not checkpointed: neuralforecast rebuilds its Lightning trainer inside `fit`, so an exact mid-run
resume (optimizer state, window sampler, RNG) is not available; an interrupted trial restarts from scratch.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from tasks.base import Diverged, TrialContext, trial_device, trial_optimizer
from tasks.forecasting.config import ForecastingConfig
from tasks.forecasting.data import PreparedData, load_series, prepare
from tasks.forecasting.models import build_model

log = logging.getLogger(__name__)

_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning")
_NOISY_WARNINGS = (
    r"Attribute '.*' removed from hparams because it cannot be pickled",
    r".*LeafSpec.* is deprecated",
    r".*does not have many workers.*",
    r".*val_check_steps is greater than max_steps.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info logs and known harmless warnings; neuralforecast's prints go to the debug log."""
    levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    stdout = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout):
            for pattern in _NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if stdout.getvalue().strip():
            log.debug("neuralforecast output:\n%s", stdout.getvalue())


def to_dataset(values: np.ndarray) -> Any:
    """A neuralforecast `TimeSeriesDataset` of a [time, series] array (integer time stamps, series in order)."""
    from neuralforecast.tsdataset import TimeSeriesDataset

    n_rows, n_series = values.shape
    frame = pd.DataFrame(
        {
            "unique_id": np.repeat([f"{j:04d}" for j in range(n_series)], n_rows),
            "ds": np.tile(np.arange(n_rows, dtype=np.int64), n_series),
            "y": values.T.reshape(-1).astype(np.float32),
        }
    )
    dataset, *_ = TimeSeriesDataset.from_df(frame)
    return dataset


def test_targets(clean: np.ndarray, test_rows: int, horizon: int, step: int) -> np.ndarray:
    """Targets of the test windows, [series, windows, horizon], in the order neuralforecast predicts them."""
    test = clean[-test_rows:].T  # [series, test_rows]
    windows = np.lib.stride_tricks.sliding_window_view(test, horizon, axis=1)  # [series, test_rows - h + 1, h]
    return windows[:, ::step, :]


@dataclass
class HoldoutScorer:
    """Scores a model on the clean test windows: MSE and MAE on the standardized scale."""

    data: PreparedData
    cfg: ForecastingConfig
    dataset: Any = field(init=False)
    targets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.dataset = to_dataset(self.data.clean)
        self.targets = test_targets(self.data.clean, self.data.split.test, self.cfg.horizon, self.cfg.test_step_size)

    def __call__(self, model: Any) -> dict[str, float]:
        model.set_test_size(self.data.split.test)
        # neuralforecast's predict reseeds torch (CPU and CUDA); the fork restores the training run's RNG streams.
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda_devices), quiet_lightning():
            pred = model.predict(self.dataset, test_size=self.data.split.test, step_size=self.cfg.test_step_size)
        pred = np.asarray(pred, dtype=np.float64).reshape(self.targets.shape)
        err = pred - self.targets
        return {"test_mse": float(np.mean(err**2)), "test_mae": float(np.mean(np.abs(err)))}


class EpochReporter(pl.Callback):
    """Reports per-epoch curves to the trial context and logs the optimizer's hyperparameters at step 0."""

    def __init__(
        self,
        ctx: TrialContext,
        steps_per_epoch: int,
        epochs: int,
        evaluate: HoldoutScorer,
        eval_model: Any,
        test_every_epoch: bool,
        resolved_hparams: Callable[[torch.optim.Optimizer], dict[str, Any]],
    ) -> None:
        self.ctx = ctx
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.evaluate = evaluate
        self.eval_model = eval_model
        self.test_every_epoch = test_every_epoch
        self.resolved_hparams = resolved_hparams
        self.optimizer: torch.optim.Optimizer | None = None
        self.last: dict[str, float] = {}
        self._losses: list[float] = []
        self._step = 0
        self._lr = math.nan
        self._t0 = time.monotonic()

    @property
    def epoch_in_progress(self) -> int:
        return self._step // self.steps_per_epoch + 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizer = trainer.optimizers[0]
        resolved = dict(self.resolved_hparams(self.optimizer))
        params = {f"optimizer.{k}": v for k, v in resolved.items()}
        params["optimizer.class"] = f"{type(self.optimizer).__module__}.{type(self.optimizer).__qualname__}"
        self.ctx.log_params(params)
        self._t0 = time.monotonic()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            self.ctx.report(step=self.epoch_in_progress, train_loss=value)
            raise Diverged(f"non-finite training loss {value} at step {trainer.global_step}")
        self._losses.append(value)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not getattr(pl_module, "valid_trajectories", None):
            return
        epoch = round(trainer.global_step / self.steps_per_epoch)
        metrics: dict[str, float] = {
            "train_loss": float(np.mean(self._losses)) if self._losses else float("nan"),
            "val_loss": float(pl_module.valid_trajectories[-1][1]),
            "lr": self._lr,  # the learning rate of the epoch's last step
            "epoch_time_s": time.monotonic() - self._t0,
        }
        if self.test_every_epoch or epoch >= self.epochs:
            self.eval_model.load_state_dict(pl_module.state_dict())
            metrics.update(self.evaluate(self.eval_model))
        self._losses = []
        self.last = {**metrics, "epoch": float(epoch)}
        self.ctx.report(step=epoch, **metrics)
        self._t0 = time.monotonic()


@dataclass
class TrialResult:
    """What one trial produced: final metrics, the trained model and the optimizer it trained with."""

    metrics: dict[str, float]
    model: Any
    optimizer: torch.optim.Optimizer | None
    data: PreparedData
    steps_per_epoch: int


def steps_per_epoch(n_train: int, input_size: int, batch_size: int) -> int:
    """Optimizer steps in one pass over the `n_train - input_size` training windows at `batch_size`."""
    return max(1, math.ceil((n_train - input_size) / batch_size))


def train_and_evaluate(
    cfg: ForecastingConfig,
    optimizer: str,
    hparams: dict[str, Any],
    ctx: TrialContext,
    callbacks: Sequence[pl.Callback] = (),
) -> TrialResult:
    """Run one trial: data, anomalies, model with the registry's optimizer, per-epoch curves, final test scores."""
    seed = int(ctx.seed)
    device = trial_device(cfg.device, ctx)

    table = load_series(cfg.data_path, cfg.data_url, cfg.url_timeout_s, cfg.fallback, cfg.allow_fallback)
    data = prepare(
        table,
        max_rows=cfg.max_rows,
        series=cfg.series,
        train_fraction=cfg.train_fraction,
        test_fraction=cfg.test_fraction,
        noise_scale=cfg.noise_scale,
        noise_fraction=cfg.noise_fraction,
        noise_space=cfg.noise_space,
        noise_seed=seed if cfg.noise_seed is None else cfg.noise_seed,
    )
    split = data.split
    if split.train <= cfg.input_size:
        raise ValueError(f"{split.train} training rows leave no window of input_size={cfg.input_size}")
    if min(split.val, split.test) < cfg.horizon:
        raise ValueError(f"validation ({split.val}) and test ({split.test}) rows must cover horizon={cfg.horizon}")
    ctx.set_tags(
        data_source=data.table.source,
        data_fallback=str(data.table.source.startswith("fallback:")).lower(),
        forecasting_model=cfg.model,
    )

    spe = steps_per_epoch(split.train, cfg.input_size, cfg.batch_size)
    # What the task supplies where the hparams are silent, as the reference runs did: the schedule length
    # (Stable-SPAM) is the trial's optimizer steps. The learning rate is bound into the class too: neuralforecast
    # passes `lr` only to classes whose signature names it.
    request = trial_optimizer(optimizer, hparams, cfg, seed, total_steps=spe * cfg.epochs)
    lr = request.lr
    optimizer_cls = request.optimizer_class()
    ctx.set_tags(**request.tags())
    ctx.log_params(
        {
            "data.source": data.table.source,
            "data.series": ",".join(data.table.names),
            "data.rows": data.table.n_rows,
            "data.split": f"{split.train}/{split.val}/{split.test}",
            "data.anomalies": int(data.mask.sum()) if cfg.noise_scale > 0 else 0,
            "data.anomaly_sigma_mean": float(data.sigma.mean()),
            "train.steps_per_epoch": spe,
            "train.max_steps": spe * cfg.epochs,
            "train.lr": lr,
        }
    )
    log.info(
        "forecasting %s on %s (%d rows x %d series, split %d/%d/%d), S=%g, %s, %d epochs x %d steps",
        cfg.model,
        data.table.source,
        data.table.n_rows,
        data.table.n_series,
        split.train,
        split.val,
        split.test,
        cfg.noise_scale,
        optimizer,
        cfg.epochs,
        spe,
    )

    common = {"n_series": data.table.n_series, "learning_rate": lr, "steps_per_epoch": spe, "seed": seed}
    with quiet_lightning():
        model = build_model(cfg, optimizer_cls=optimizer_cls, device=device, **common)
        eval_model = build_model(cfg, optimizer_cls=None, device=device, **common)
    evaluator = HoldoutScorer(data, cfg)
    reporter = EpochReporter(
        ctx, spe, cfg.epochs, evaluator, eval_model, cfg.test_every_epoch,
        functools.partial(request.verify, where="neuralforecast's optimizer"),
    )
    # Callbacks go into the trainer kwargs after construction, so that they stay out of the saved hparams.
    model.trainer_kwargs["callbacks"] = [reporter, *callbacks]

    train_ds = to_dataset(data.noisy)
    try:
        with quiet_lightning():
            model.fit(train_ds, val_size=split.val, test_size=split.test, random_seed=seed)
    except Diverged:
        raise
    except Exception as exc:
        if "Loss is NaN" not in str(exc):
            raise
        ctx.report(step=reporter.epoch_in_progress, train_loss=math.nan)
        raise Diverged(f"NaN training loss: {exc}") from exc

    final = dict(reporter.last)
    if "test_mse" not in final:
        final.update(evaluator(model))
    metrics = {k: final[k] for k in ("test_mse", "test_mae", "val_loss", "train_loss") if k in final}
    metrics["epochs"] = float(cfg.epochs)
    metrics["steps"] = float(spe * cfg.epochs)
    return TrialResult(metrics=metrics, model=model, optimizer=reporter.optimizer, data=data, steps_per_epoch=spe)
