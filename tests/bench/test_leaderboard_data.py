"""Leaderboard tables state the data their trials trained on and flag runs of more than one pass."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from bench import leaderboard


@pytest.mark.slow
def test_data_statement_flags_multi_epoch_runs(tmp_path: Path) -> None:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    runs = {}
    for key, passes, epochs in (("a", "0.91", "single pass"), ("b", "0.91", "single pass"), ("c", "12", "multi-epoch")):
        run = client.create_run(exp)
        client.set_tag(run.info.run_id, "data_source", "offline:wikipedia+shakespeare+kjv")
        client.set_tag(run.info.run_id, "data_passes", passes)
        client.set_tag(run.info.run_id, "data_epochs", epochs)
        client.log_param(run.info.run_id, "data.corpus_tokens", 3610367)
        runs[key] = client.get_run(run.info.run_id)
    trials = [SimpleNamespace(key=k) for k in ("a", "b")]
    single = leaderboard.data_statement(trials, runs)
    assert single == "Data: offline:wikipedia+shakespeare+kjv (3.6M tokens), 0.91 passes"
    both = leaderboard.data_statement([*trials, SimpleNamespace(key="c")], runs)
    assert both.count("offline:") == 2 and "12 passes — **MULTI-EPOCH" in both
    assert leaderboard.data_statement([SimpleNamespace(key="missing")], runs) == ""
