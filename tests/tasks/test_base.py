"""The task contract's shared pieces: divergence guard, hparam filling, data-path checks, the local context."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from tasks.base import GRAD_NORM_LIMIT, Diverged, ExistingPath, LocalContext, TaskConfig, check_finite, fill_hparams


@pytest.mark.parametrize("metrics", [{"loss": math.nan}, {"train_loss": math.inf}, {"val_loss": -math.inf},
                                     {"grad_norm": math.nan}, {"grad_norm": GRAD_NORM_LIMIT * 10}])
def test_non_finite_loss_or_exploding_gradient_is_divergence(metrics):
    with pytest.raises(Diverged):
        check_finite(metrics)


def test_finite_metrics_and_unguarded_names_pass():
    check_finite({"loss": 2.0, "grad_norm": GRAD_NORM_LIMIT, "lr": math.nan, "test_return": -1e9})


def test_report_records_the_point_before_raising(tmp_path):
    ctx = LocalContext(workdir=tmp_path)
    ctx.report(1, loss=3.0)
    with pytest.raises(Diverged, match="loss=nan"):
        ctx.report(2, loss=math.nan)
    assert [s for s, _ in ctx.series("loss")] == [1, 2]  # the diverged trial keeps its last metrics


def test_fill_hparams_fills_only_accepted_and_unset():
    merged, filled = fill_hparams("stable_spam", {"lr": 1e-3}, lr=5.0, total_steps=100, seed=None, rank=4)
    assert merged == {"lr": 1e-3, "total_steps": 100} and filled == {"total_steps": 100}
    merged, filled = fill_hparams("adamw", {}, total_steps=100, lr=2e-3)
    assert merged == {"lr": 2e-3} and filled == {"lr": 2e-3}


def test_existing_path_is_checked_when_the_config_is_validated(tmp_path):
    class Config(TaskConfig):
        data: ExistingPath | None = None

    assert Config(data=str(tmp_path)).data == str(tmp_path)
    with pytest.raises(ValidationError, match="does not exist"):
        Config(data=str(tmp_path / "missing"))


def test_local_checkpoint_round_trip(tmp_path):
    ctx = LocalContext(workdir=tmp_path)
    assert ctx.load_checkpoint() is None
    ctx.save_checkpoint({"step": 7, "values": [1.0, 2.0]})
    assert LocalContext(workdir=tmp_path).load_checkpoint() == {"step": 7, "values": [1.0, 2.0]}


def test_trial_optimizer_takes_the_trials_lr_else_the_configs_field():
    import torch

    from tasks.base import trial_optimizer
    from tasks.forecasting.config import ForecastingConfig

    cfg = ForecastingConfig(learning_rate=2e-3)
    own = trial_optimizer("stable_spam", {"lr": 1e-2}, cfg, 7, total_steps=50)
    assert own.hparams == {"lr": 1e-2, "total_steps": 50} and own.lr_source == "hparams"
    assert own.tags() == {"task_filled_hparams": "total_steps=50"}  # the lr is not a filled value
    task = trial_optimizer("spam", {}, cfg, 7, total_steps=50)
    assert task.lr == 2e-3 and task.lr_source == "task config" and task.filled == {"seed": 7}
    opt, resolved = task.build([torch.zeros(2, requires_grad=True)])
    assert resolved["lr"] == 2e-3 and resolved["seed"] == 7
    other = trial_optimizer("spam", {"lr": 1.0}, cfg).build([torch.zeros(2, requires_grad=True)])[0]
    with pytest.raises(RuntimeError, match="requested 0.002"):
        task.verify(other, "the test's optimizer")
