"""Every registered task honours the contract of `tasks.base.Task`: one test per task, generated from the registry."""

from __future__ import annotations

import math

import pytest

import tasks
from tasks.base import LocalContext, Resources, Task, TaskConfig

NAMES = tasks.available()


@pytest.fixture(params=NAMES)
def task(request: pytest.FixtureRequest) -> Task:
    return tasks.get_task(request.param)


def test_declarations(task: Task) -> None:
    assert isinstance(task, Task) and task.name in NAMES
    assert task.metric and task.mode in ("min", "max") and task.summary in ("mean", "iqm")
    assert task.paper_metric is None or task.paper_metric != task.metric
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in task.statistics.items())
    assert issubclass(task.Config, TaskConfig) and task.Config.lr_field in task.Config.model_fields


@pytest.mark.parametrize("preset", ["smoke", "*"])
def test_presets_validate_with_sane_resources(task: Task, preset: str) -> None:
    assert "smoke" in task.presets
    for name in [preset] if preset != "*" else list(task.presets):
        cfg = task.config(name)
        r = task.resources(cfg)
        assert isinstance(r, Resources) and r.cpus > 0 and r.workers >= 1
        assert r.gpus <= r.workers, f"{task.name}:{name} asks for more than one GPU per worker"
        assert task.estimate_flops(cfg) >= 0 and task.estimate_seconds(cfg) >= 0
        if name == "smoke":
            assert r.gpus == 0, "the smoke preset must run on the CPU"


def test_unknown_preset_and_field_are_refused(task: Task) -> None:
    with pytest.raises(KeyError, match="valid"):
        task.config("no-such-preset")
    with pytest.raises(ValueError):
        task.config("smoke", {"no_such_field": 1})


@pytest.mark.slow
def test_smoke_run_reports_the_headline_metric(task: Task, tmp_path) -> None:
    cfg = task.config("smoke", {"device": "cpu"} if "device" in task.Config.model_fields else None)
    ctx = LocalContext(seed=0, device="cpu", workdir=tmp_path)
    final = task.run(cfg, "adamw", {}, ctx)
    assert math.isfinite(final[task.metric])
    assert ctx.params and ctx.tags["task_filled_hparams"]
