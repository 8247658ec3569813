"""Fixtures of the fine-tuning tests: the task runs in-process with `LocalContext`, offline, on one CPU thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.base import LocalContext
from tasks.finetune import FinetuneConfig, FinetuneTask

# The smoke preset shrunk further: a few steps, a few evaluation examples.
QUICK: dict[str, Any] = {"steps": 6, "warmup_steps": 1, "max_eval_examples": 8, "log_every": 1, "checkpoint_every": 3}

Run = tuple[dict[str, float], LocalContext]


def _config(preset: str = "smoke", quick: bool = True, **overrides: Any) -> FinetuneConfig:
    cfg = FinetuneTask().config(preset, {**(QUICK if quick else {}), **overrides})
    assert isinstance(cfg, FinetuneConfig)
    return cfg


def _run(cfg: FinetuneConfig, optimizer: str = "adamw", hparams: dict[str, Any] | None = None,
         ctx: LocalContext | None = None) -> Run:
    ctx = ctx or LocalContext(seed=0, device="cpu")
    return FinetuneTask().run(cfg, optimizer, hparams or {}, ctx), ctx


@pytest.fixture(name="make_config")
def make_config_fixture() -> Callable[..., FinetuneConfig]:
    """`make_config(preset="smoke", quick=True, **overrides)`: a validated config (quick: `QUICK` applied)."""
    return _config


@pytest.fixture(name="run_task")
def run_task_fixture() -> Callable[..., Run]:
    """`run_task(cfg, optimizer="adamw", hparams=None, ctx=None)` -> (final metrics, context)."""
    return _run


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The smoke preset as it ships, with AdamW, run once for the tests that only read its results."""
    ctx = LocalContext(seed=0, device="cpu", workdir=Path(tmp_path_factory.mktemp("finetune-smoke")))
    return _run(_config("smoke", quick=False), ctx=ctx)
