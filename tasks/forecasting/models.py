"""Building neuralforecast models for the forecasting task, with the registry's optimizer passed through.

neuralforecast takes the optimizer as a class (`optimizer=`, checked with `issubclass(cls, torch.optim.Optimizer)`)
and instantiates it as `cls(params=..., lr=learning_rate, **optimizer_kwargs)` when training starts. The task
passes the class that `optimizers.optimizer_class(name, **hparams)` returns, with every hyperparameter (lr too)
bound into it, and no `optimizer_kwargs`.
"""

from __future__ import annotations

import inspect
from importlib import import_module
from typing import Any

import torch

from tasks.forecasting.config import RESERVED_MODEL_KWARGS, ForecastingConfig

# model name -> module under neuralforecast.models
MODEL_MODULES: dict[str, str] = {
    "PatchTST": "patchtst",
    "NHITS": "nhits",
    "NBEATS": "nbeats",
    "MLP": "mlp",
    "DLinear": "dlinear",
    "NLinear": "nlinear",
    "TiDE": "tide",
    "iTransformer": "itransformer",
    "TSMixer": "tsmixer",
}

# Lightning trainer settings of every trial: quiet, no checkpoints or loggers of its own.
QUIET_TRAINER = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "logger": False,
    "num_sanity_val_steps": 0,
}


def model_class(name: str) -> type:
    if name not in MODEL_MODULES:
        raise KeyError(f"unknown forecasting model {name!r}; valid: {', '.join(MODEL_MODULES)}")
    return getattr(import_module(f"neuralforecast.models.{MODEL_MODULES[name]}"), name)


def architecture_kwargs(cls: type) -> set[str]:
    """The constructor arguments of a model class that describe its architecture (plus `scaler_type`)."""
    from neuralforecast.common._base_model import BaseModel

    own = set(inspect.signature(cls.__init__).parameters)
    base = set(inspect.signature(BaseModel.__init__).parameters)
    return (own - base - RESERVED_MODEL_KWARGS - {"self", "trainer_kwargs"}) | {"scaler_type"}


class EpochDecayLR(torch.optim.lr_scheduler.LambdaLR):
    """PatchTST's 'type3' schedule per step: lr * gamma ** max(0, epoch - hold_epochs), epoch = step // steps."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        gamma: float = 0.9,
        hold_epochs: int = 3,
        last_epoch: int = -1,
    ) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.gamma = gamma
        self.hold_epochs = hold_epochs
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, step: int) -> float:
        return self.gamma ** max(0, step // self.steps_per_epoch - self.hold_epochs)


def accelerator_kwargs(device: str) -> dict[str, Any]:
    """Lightning `accelerator`/`devices` for "cpu", "cuda" or "cuda:N"."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("the forecasting config asks for device='cuda' but no CUDA device is visible")
        _, _, index = device.partition(":")
        return {"accelerator": "gpu", "devices": [int(index)] if index else 1}
    return {"accelerator": "cpu", "devices": 1}


def build_model(
    cfg: ForecastingConfig,
    *,
    n_series: int,
    optimizer_cls: type[torch.optim.Optimizer] | None,
    learning_rate: float,
    steps_per_epoch: int,
    seed: int,
    device: str,
) -> Any:
    """A neuralforecast model for `cfg`, trained for `cfg.epochs * steps_per_epoch` steps, validating each epoch."""
    from neuralforecast.losses.pytorch import MAE, MSE

    cls = model_class(cfg.model)
    unknown = sorted(set(cfg.model_kwargs) - architecture_kwargs(cls))
    if unknown:
        raise ValueError(
            f"model_kwargs {unknown} are not architecture arguments of {cfg.model}; "
            f"valid: {sorted(architecture_kwargs(cls))}"
        )
    multivariate = bool(getattr(cls, "MULTIVARIATE", False))
    loss_cls = MSE if cfg.loss == "mse" else MAE
    # Multivariate models count windows in time positions (each holds every series), univariate ones per series.
    eval_windows = max(1, cfg.eval_batch_size // n_series) if multivariate else cfg.eval_batch_size
    kwargs: dict[str, Any] = {
        "h": cfg.horizon,
        "input_size": cfg.input_size,
        "loss": loss_cls(),
        "valid_loss": loss_cls(),
        "max_steps": cfg.epochs * steps_per_epoch,
        "val_check_steps": steps_per_epoch,
        "learning_rate": learning_rate,
        "batch_size": n_series,  # every step sees windows of every series
        "windows_batch_size": cfg.batch_size if multivariate else cfg.batch_size * n_series,
        "inference_windows_batch_size": eval_windows,
        "random_seed": seed,
        "optimizer": optimizer_cls,
        **cfg.model_kwargs,
        **QUIET_TRAINER,
        **accelerator_kwargs(device),
    }
    if multivariate:
        kwargs["n_series"] = n_series
    if cfg.lr_schedule == "type3":
        kwargs["lr_scheduler"] = EpochDecayLR
        kwargs["lr_scheduler_kwargs"] = {"steps_per_epoch": steps_per_epoch}
    else:
        kwargs["num_lr_decays"] = -1  # neuralforecast's StepLR then never decays
    return cls(**kwargs)
