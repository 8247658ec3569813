"""The forecasting task end to end on CPU: config, curves, the registry's optimizer in the model, divergence."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pydantic import ValidationError

import optimizers
from tasks.base import Diverged, LocalContext
from tasks.forecasting import PRESETS, ForecastingConfig, ForecastingTask, training
from tasks.forecasting.data import WEATHER_ENV, load_fallback

TASK = ForecastingTask()


def adam_like() -> tuple[str, dict[str, Any]]:
    """The registry's Adam with non-default hyperparameters."""
    return "adam", {"lr": 3e-3, "weight_decay": 0.05, "betas": (0.8, 0.95), "eps": 1e-7}


class Spy(pl.Callback):
    """Finds the optimizer through the Lightning trainer and the module, and the data the model trains on."""

    def __init__(self) -> None:
        self.from_trainer: torch.optim.Optimizer | None = None
        self.from_module: Any = None
        self.train_y: np.ndarray | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.train_y is None:
            self.train_y = batch["temporal"][:, batch["y_idx"], :].cpu().numpy()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.from_trainer = trainer.optimizers[0]
        self.from_module = pl_module.optimizers()


@pytest.fixture(autouse=True)
def _no_weather_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEATHER_ENV, raising=False)


@pytest.fixture(scope="module")
def smoke_run() -> dict[str, Any]:
    """One smoke trial with anomalies (S=5), through the trainer function, with a spy on the registry."""
    name, hparams = adam_like()
    made: list[type] = []
    original = optimizers.optimizer_class

    def recording_optimizer_class(n: str, **kw: Any) -> type:
        cls = original(n, **kw)
        made.append(cls)
        return cls

    mp = pytest.MonkeyPatch()
    mp.setattr(optimizers, "optimizer_class", recording_optimizer_class)
    mp.delenv(WEATHER_ENV, raising=False)
    try:
        spy = Spy()
        ctx = LocalContext(seed=0, device="cpu")
        cfg = TASK.config("smoke", {"noise_scale": 5.0})
        result = training.train_and_evaluate(cfg, name, hparams, ctx, callbacks=[spy])
    finally:
        mp.undo()
    return {"name": name, "hparams": hparams, "made": made, "spy": spy, "ctx": ctx, "cfg": cfg, "result": result}


def test_presets_validate_and_describe_the_paper_setting() -> None:
    assert set(PRESETS) == {"smoke", "mini", "paper"}
    for preset in PRESETS:
        assert isinstance(TASK.config(preset), ForecastingConfig)
    paper = TASK.config("paper")
    assert (paper.model, paper.input_size, paper.horizon, paper.epochs, paper.loss) == ("PatchTST", 336, 96, 100, "mse")
    assert paper.noise_fraction == 0.1 and paper.device == "cuda"
    assert TASK.metric == "test_mse" and TASK.mode == "min"
    assert TASK.config("paper", {"noise_scale": 5.0}).noise_scale == 5.0


def test_registry_entry_resolves() -> None:
    module, name = "tasks.forecasting.task:ForecastingTask".split(":")  # the line the task registry gets
    cls = getattr(import_module(module), name)
    assert cls is ForecastingTask and cls.name == "forecasting"


@pytest.mark.parametrize(
    "overrides",
    [
        {"noise_scale": -1.0},
        {"noise_fraction": 1.5},
        {"model": "Prophet"},
        {"model_kwargs": {"max_steps": 5}},
        {"data_url": "ftp://example.org/weather.csv"},
        {"train_fraction": 0.8, "test_fraction": 0.2},
        {"device": "tpu"},
        {"unknown_field": 1},
    ],
)
def test_invalid_configs_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TASK.config("smoke", overrides)


def test_resources() -> None:
    assert TASK.resources(TASK.config("smoke")).gpus == 0
    mini = TASK.resources(TASK.config("mini"))
    assert 0 < mini.gpus < 1 and mini.cpus >= 1


@pytest.mark.slow
def test_smoke_run_logs_test_mse_and_per_epoch_curves(smoke_run: dict[str, Any]) -> None:
    ctx, cfg, result = smoke_run["ctx"], smoke_run["cfg"], smoke_run["result"]
    assert np.isfinite(result.metrics["test_mse"]) and np.isfinite(result.metrics["test_mae"])
    assert result.metrics["steps"] == cfg.epochs * result.steps_per_epoch
    for metric in ("train_loss", "val_loss", "test_mse", "test_mae", "lr"):
        assert [s for s, _ in ctx.series(metric)] == list(range(1, cfg.epochs + 1)), metric
    assert ctx.series("test_mse")[-1][1] == pytest.approx(result.metrics["test_mse"])
    # 720 rows: 503 train, 48 inputs -> 455 windows per series, 64 per step -> 8 steps per epoch.
    assert result.steps_per_epoch == 8 and ctx.params["train.steps_per_epoch"] == 8
    assert ctx.tags["data_source"] == "fallback:vic_elec" and ctx.tags["data_fallback"] == "true"
    assert ctx.params["data.anomalies"] == 2 * round(0.1 * result.data.split.train)


def test_the_registry_optimizer_is_the_one_in_the_model(smoke_run: dict[str, Any]) -> None:
    spy, made, result, hparams = smoke_run["spy"], smoke_run["made"], smoke_run["result"], smoke_run["hparams"]
    # neuralforecast got the class from optimizers.optimizer_class (with every hyperparameter bound into it)...
    assert len(made) == 1 and issubclass(made[0], torch.optim.Optimizer)
    assert made[0].registry_name == "adam" and made[0].registry_hparams == hparams
    # ...and the optimizer Lightning steps, seen from the trainer and from the module, is the registry's build.
    opt = spy.from_trainer
    assert opt is not None and opt is spy.from_module.optimizer and opt is result.optimizer
    assert opt.registry_info.name == "adam"
    resolved = optimizers.resolved_hparams(opt)
    assert resolved["optimizer"] == "adam"
    for key, value in hparams.items():
        assert resolved[key] == pytest.approx(value), key
    logged = smoke_run["ctx"].params
    assert logged["optimizer.optimizer"] == "adam" and logged["optimizer.lr"] == pytest.approx(hparams["lr"])
    assert logged["optimizer.weight_decay"] == pytest.approx(hparams["weight_decay"])


def test_anomalies_reach_training_and_never_the_test_split(smoke_run: dict[str, Any]) -> None:
    data, spy = smoke_run["result"].data, smoke_run["spy"]
    train = data.split.train
    # The model trained on the injected series...
    np.testing.assert_allclose(spy.train_y, data.noisy.T.astype(np.float32))
    assert np.abs(data.noisy[:train] - data.clean[:train]).max() > 1.0
    # ...whose validation and test rows are the clean ones, and the test windows are scored on clean data.
    np.testing.assert_array_equal(data.noisy[train:], data.clean[train:])
    evaluator = training.HoldoutScorer(data, smoke_run["cfg"])
    np.testing.assert_array_equal(evaluator.targets[:, 0, :], data.clean[-data.split.test :][:24].T)


@pytest.mark.slow
def test_task_run_is_seeded_and_test_curves_do_not_perturb_training() -> None:
    name, hparams = adam_like()
    results = []
    for every in (True, False):
        ctx = LocalContext(seed=1, device="cpu")
        results.append(TASK.run(TASK.config("smoke", {"epochs": 2, "test_every_epoch": every}), name, hparams, ctx))
    assert set(results[0]) >= {"test_mse", "test_mae", "val_loss", "train_loss"}
    assert results[0] == results[1]
    assert [s for s, _ in ctx.series("test_mse")] == [2]  # without per-epoch curves: only at the end


@pytest.mark.slow
def test_weather_csv_run_is_tagged_with_its_source(tmp_path: Path) -> None:
    table = load_fallback("vic_elec")
    path = tmp_path / "weather.csv"
    frame = pd.DataFrame({"date": np.arange(600), **{n: table.values[:600, j] for j, n in enumerate(table.names)}})
    frame.to_csv(path, index=False)
    name, hparams = adam_like()
    ctx = LocalContext(seed=0, device="cpu")
    out = TASK.run(TASK.config("smoke", {"data_path": str(path), "epochs": 1}), name, hparams, ctx)
    assert np.isfinite(out["test_mse"])
    assert ctx.tags["data_source"] == f"weather:{path}" and ctx.tags["data_fallback"] == "false"


@pytest.mark.slow
def test_stable_spam_gets_the_trial_length_as_total_steps() -> None:
    ctx = LocalContext(seed=0, device="cpu")
    out = TASK.run(TASK.config("smoke", {"epochs": 1, "noise_scale": 2.0}), "stable_spam", {"lr": 1e-3}, ctx)
    assert np.isfinite(out["test_mse"])
    assert ctx.params["optimizer.optimizer"] == "stable_spam"
    assert ctx.params["optimizer.total_steps"] == out["steps"] == ctx.params["train.max_steps"]
    assert ctx.tags["task_filled_hparams"] == f"total_steps={int(out['steps'])}"


@pytest.mark.slow
def test_other_neuralforecast_models_are_selectable() -> None:
    name, hparams = adam_like()
    ctx = LocalContext(seed=0, device="cpu")
    cfg = TASK.config("smoke", {"model": "NHITS", "model_kwargs": {"mlp_units": [[16, 16]] * 3}, "epochs": 1})
    assert np.isfinite(TASK.run(cfg, name, hparams, ctx)["test_mse"])
    with pytest.raises(ValueError, match="not architecture arguments"):
        TASK.run(TASK.config("smoke", {"model_kwargs": {"no_such_argument": 1}}), name, hparams, ctx)


def test_divergence_is_reported(smoke_run: dict[str, Any]) -> None:
    name, hparams = adam_like()
    ctx = LocalContext(seed=0, device="cpu")
    with pytest.raises(Diverged):
        TASK.run(TASK.config("smoke", {"noise_scale": 5.0}), name, {**hparams, "lr": 1e6}, ctx)
    assert not np.isfinite(ctx.series("train_loss")[-1][1])
