"""Helpers of the LLaMA pre-training tests: run the task in-process with `LocalContext`, offline, on CPU."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks.base import LocalContext
from tasks.llm_pretrain import LLMPretrainTask
from tasks.llm_pretrain.data import offline_corpus


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


def _write_c4_shards(folder: Path) -> list[str]:
    """Real text (the offline package text's validation documents, pieces of at most 1200 characters) in the
    allenai/c4 layout: json lines with a `text` field in gzip shards, 300 training and 60 validation documents.
    Returns the documents, training ones first."""
    corpus = offline_corpus(["wikipedia", "shakespeare", "kjv"], 0.05, seed=0, max_doc_chars=1200, packing=False)
    docs = list(itertools.islice(corpus.validation(), 360))
    for split, items in {"train": docs[:300], "validation": docs[300:]}.items():
        for shard in range(2):
            with gzip.open(folder / f"c4-{split}.{shard:05d}-of-00002.json.gz", "wt", encoding="utf-8") as f:
                for d in items[shard::2]:
                    f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "x"}) + "\n")
    return docs


@pytest.fixture(name="write_c4_shards")
def write_c4_shards_fixture() -> Callable[[Path], list[str]]:
    """`write_c4_shards(folder)` -> the documents written as allenai/c4 json.gz shards."""
    return _write_c4_shards
