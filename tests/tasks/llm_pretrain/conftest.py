"""Helpers of the LLaMA pre-training tests: run the task in-process with `LocalContext`, offline, on CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks.base import LocalContext
from tasks.llm_pretrain import LLMPretrainTask


@dataclass
class Run:
    result: dict[str, float]
    ctx: LocalContext
    logs: list[logging.LogRecord] = field(default_factory=list)

    def losses(self) -> list[float]:
        return [v for _, v in self.ctx.series("loss")]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_task(overrides: dict[str, Any] | None = None, optimizer: str = "adamw", hparams: dict[str, Any] | None = None,
             ctx: LocalContext | None = None, preset: str = "smoke") -> Run:
    task = LLMPretrainTask()
    cfg = task.config(preset, overrides or {})
    ctx = ctx or LocalContext(seed=0, device="cpu")
    handler = _Collect()
    logger = logging.getLogger("tasks.llm_pretrain")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = task.run(cfg, optimizer, hparams or {}, ctx)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return Run(result, ctx, handler.records)


@pytest.fixture(name="run_task")
def run_task_fixture() -> Callable[..., Run]:
    """`run_task(overrides, optimizer=..., hparams=..., ctx=..., preset=...)` -> `Run`."""
    return run_task


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The smoke preset with AdamW, run once for the tests that only read its results."""
    return run_task(ctx=LocalContext(seed=0, device="cpu", workdir=Path(tmp_path_factory.mktemp("smoke"))))
