"""The leaderboard of an LLM table shows our exact perplexity and, labelled beside it, the papers' estimator."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench import leaderboard, tracking
from bench.results import Results
from bench.runner import run_trial
from bench.suite import Experiment, OptimizerEntry, Suite, expand
from tasks.llm_pretrain.task import PAPER_ESTIMATE


@pytest.mark.slow
def test_llm_table_shows_both_perplexities_labelled(tmp_path: Path) -> None:
    suite = Suite(name="estimator", experiments=[Experiment(
        task="llm_pretrain", preset="smoke", table="llm_pretrain_bf16", column="llama_60m",
        overrides={"steps": 10, "eval_every": 10, "checkpoint_every": 10},
        optimizers=[OptimizerEntry(name="adam", label="adam")])])
    trials = expand(suite)
    mp = pytest.MonkeyPatch()
    mp.setenv("BENCH_HOME", str(tmp_path / ".bench"))
    uri = f"sqlite:///{tmp_path / '.bench' / 'mlflow.db'}"
    try:
        tracking.prepare_store(uri)
        exp_id = tracking.experiment_id(uri, "estimator")
        parent = tracking.start_parent(uri, exp_id, "estimator", {"bench.suite": "estimator"})
        spec = trials[0].spec
        run_id = tracking.create_trial_run(uri, exp_id, parent, spec, {})
        run_trial({"spec": spec.model_dump(), "tracking_uri": uri, "run_id": run_id,
                   "trial_dir": str(tmp_path / "trial"), "gpus": 0}, tune_report=False)
        run = MlflowClient(uri).get_run(run_id)
        (table,) = leaderboard.build_tables(trials, Results(uri, {spec.key(): run}))
    finally:
        mp.undo()
    ours, estimate = run.data.metrics["final.val_perplexity"], run.data.metrics[f"final.{PAPER_ESTIMATE}"]
    assert estimate < ours
    assert table.header() == ["optimizer", "llama_60m", "llama_60m (papers' estimator)", "llama_60m (paper)", "seeds"]
    (row,) = table.body()
    assert row[0] == "adam" and float(row[1]) == pytest.approx(ours, rel=1e-3)
    assert float(row[2]) == pytest.approx(estimate, rel=1e-3) and row[3] == "34.09"
    assert "papers' estimator" in table.markdown().splitlines()[0]
