"""The analyses of the smoke suite on a real MLflow store: its analysis trials run in-process through the harness's
trial body, then `leaderboard.write()` produces every analysis table and plot; the numbers are checked against the
runs they come from."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench import leaderboard, tracking
from bench.analyses import ANALYSES
from bench.runner import run_trial
from bench.suite import Suite, Trial, expand, load, load_trials, unique_specs

EXPERIMENT = "bench-smoke-analyses"


def analysis_trials() -> list[Trial]:
    """The smoke suite's experiments whose table has an analysis."""
    suite, _, _ = load("smoke")
    experiments = [e for e in suite.experiments if e.analysis]
    return expand(Suite(name="smoke-analyses", experiments=experiments))


def run_in_process(trials: list[Trial], root: Path, experiment: str) -> tuple[str, Path, str]:
    """Each distinct trial through `run_trial` (the body of a Ray Tune trial) into a fresh MLflow store, then the
    leaderboard; returns the store's URI, the output folder and the printed text."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BENCH_HOME", str(root / ".bench"))
    uri = f"sqlite:///{root / '.bench' / 'mlflow.db'}"
    try:
        tracking.prepare_store(uri)
        exp_id = tracking.experiment_id(uri, experiment)
        parent = tracking.start_parent(uri, exp_id, experiment, {"bench.suite": experiment})
        for spec in unique_specs(trials):
            run_id = tracking.create_trial_run(uri, exp_id, parent, spec, {})
            run_trial({"spec": spec.model_dump(), "tracking_uri": uri, "run_id": run_id,
                       "trial_dir": str(root / "trials" / spec.key()), "gpus": 0}, tune_report=False)
        text, _ = leaderboard.write(trials, uri, experiment, root / "results")
    finally:
        mp.undo()
    return uri, root / "results", text


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Trial], str, Path, str]:
    trials = analysis_trials()
    uri, out, text = run_in_process(trials, tmp_path_factory.mktemp("analyses"), EXPERIMENT)
    return trials, uri, out, text


def test_smoke_suite_has_every_analysis():
    assert {t.analysis for t in analysis_trials()} == set(ANALYSES)


@pytest.mark.slow
def test_every_analysis_writes_its_tables_and_plots(store):
    _, _, out, text = store
    for name in ("spikes_adam_spikes_over_steps.png", "spikes_adam_spikes_heatmap.png", "spikes_adam_loss_spikes.png",
                 "memory_sparse_momentum_memory.png", "sensitivity_stable_spam_sweep.png",
                 "dynamics_adam_lowbit_dynamics.png"):
        assert (out / name).stat().st_size > 5000, name
    for name in ("spikes_adam_spikes.md", "memory_sparse_momentum_memory.md", "sensitivity_stable_spam_sweep.md",
                 "dynamics_adam_lowbit_dynamics.md", "llm_pretrain_4bit_steps_to_adam.md"):
        assert (out / name).read_text().startswith("### "), name
        assert (out / name).read_text().strip() in text  # printed and in leaderboard.md too
        assert (out / name).read_text().strip() in (out / "leaderboard.md").read_text()
    assert not (out / "sensitivity_stable_spam_lr_sweep.png").exists()  # the analysis draws the sweep


def runs_by_label(trials: list[Trial], uri: str, table: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = tracking.trial_runs(uri, exp.experiment_id)
    return {t.row + "".join(f" {k}={v}" for k, v in t.point.items()): runs[t.key] for t in trials if t.table == table}


@pytest.mark.slow
def test_spike_table_sums_the_logged_windows(store):
    trials, uri, out, _ = store
    run = runs_by_label(trials, uri, "spikes_adam")["adam"]
    client = MlflowClient(uri)
    total = sum(m.value for m in client.get_metric_history(run.info.run_id, "spikes/total"))
    attention = sum(m.value for m in client.get_metric_history(run.info.run_id, "spikes/attention"))
    row = (out / "spikes_adam_spikes.md").read_text().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["tiny", "adam"]
    assert cells[2].startswith(f"{total:.0f} (")
    assert cells[4].startswith(f"{attention:.0f} (max ")
    with open(out / "spikes_adam.csv") as f:
        assert next(csv.reader(f))[0] == "optimizer"  # the usual table of final metrics is kept


@pytest.mark.slow
def test_memory_table_reports_measured_bytes(store):
    trials, uri, out, _ = store
    runs = runs_by_label(trials, uri, "memory_sparse_momentum")
    state = {label: r.data.metrics["final.optimizer_state_bytes"] for label, r in runs.items()}
    assert state["adam_mini"] < state["spam_d0.25"] < state["adam"]
    assert runs["spam_d0.25"].data.metrics["final.optimizer_state_index_bytes"] > 0
    text = (out / "memory_sparse_momentum_memory.md").read_text()
    assert "| tiny | spam_d0.25 | " in text and f"{state['spam_d0.25'] / 2**20:.1f} MiB" in text
    assert "n/a (CPU run)" in text and "1.00×" in text


@pytest.mark.slow
def test_sensitivity_table_has_one_column_per_grid_value(store):
    _, _, out, _ = store
    text = (out / "sensitivity_stable_spam_sweep.md").read_text()
    assert "final val_loss against reset_interval" in text and "| optimizer | 10 | 20 |" in text


DIVERGING = """\
name: diverging
experiments:
  - {task: llm_pretrain, preset: smoke, table: sensitivity_nan, analysis: sensitivity,
     column: tiny, seeds: 2, optimizers: [adamw],
     overrides: {steps: 10, eval_every: 5, inject_nan_at: [null, 7]}}
  - {task: llm_pretrain, preset: smoke, table: dynamics_nan, analysis: dynamics,
     column: tiny, seeds: 2, optimizers: [adamw],
     overrides: {steps: 10, eval_every: 5, inject_nan_at: [null, 7]}}
"""


@pytest.mark.slow
def test_seed_spread_and_divergence_in_sweeps_and_curves(tmp_path):
    (tmp_path / "diverging.yaml").write_text(DIVERGING)
    _, trials = load_trials(str(tmp_path / "diverging.yaml"))
    _, out, _ = run_in_process(trials, tmp_path, "bench-diverging")
    sweep = (out / "sensitivity_nan_sweep.md").read_text()
    assert "| optimizer | None | 7 |" in sweep
    assert "± " in sweep.splitlines()[-1] and "diverged (2/2)" in sweep.splitlines()[-1]
    dynamics = (out / "dynamics_nan_dynamics.md").read_text()
    assert "| tiny | adamw inject_nan_at=7 | diverged | non-finite |" in dynamics
    assert (out / "sensitivity_nan_sweep.png").exists() and (out / "dynamics_nan_dynamics.png").exists()
