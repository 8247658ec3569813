"""Results read from a real MLflow store: the one outcome rule, the analysis and reference row a suite names, the
learning rate of a sweep taken from the trials, and a trial's identity untouched by the new fields."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench import analyses, leaderboard, tracking
from bench.results import Results
from bench.suite import Trial, load_trials

SUITE = """\
name: r
experiments:
  - task: llm_pretrain
    preset: smoke
    table: plain_name
    analysis: steps
    reference: base
    hparams: {lr: 1e-3}
    optimizers: [{name: adamw, label: base}, {name: adamw, label: other, hparams: {lr: 3e-3}}]
  - task: llm_pretrain
    preset: smoke
    table: spikes_by_name_only
    column: tiny lr=5
    hparams: {lr: 2e-3}
    optimizers: [adamw]
  - task: llm_pretrain
    preset: smoke
    table: mem
    analysis: memory
    reference: small
    hparams: {lr: [4e-3, 5e-3]}
    optimizers: [{name: adamw, label: small, hparams: {weight_decay: 0.0}}, {name: adamw, label: big}]
"""


def trials_of(tmp_path: Path, text: str) -> list[Trial]:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_trials(str(path))[1]


def record(client: MlflowClient, exp: str, status: str | None, metrics: dict[str, list[tuple[int, float]]]) -> object:
    run = client.create_run(exp)
    if status:
        client.set_tag(run.info.run_id, tracking.STATUS_TAG, status)
    for name, points in metrics.items():
        for step, value in points:
            client.log_metric(run.info.run_id, name, value, step=step)
    return client.get_run(run.info.run_id)


@pytest.fixture
def store(tmp_path: Path) -> tuple[list[Trial], Results]:
    trials = trials_of(tmp_path, SUITE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    loss = {"base": [(10, 5.0), (20, 4.0)], "other": [(10, 3.9), (20, 3.0)], "adamw": [(10, 1.0)]}
    state = {"small": 100.0, "big": 200.0}
    runs = {}
    for t in trials:
        metrics = {"val_loss": loss.get(t.row, [(10, 1.0)]), "final.val_perplexity": [(0, 30.0)]}
        if t.row in state:
            metrics["final.optimizer_state_bytes"] = [(0, state[t.row] * (1 + t.point["lr"]))]
        runs[t.key] = record(client, exp, "finished", metrics)
    return trials, Results(uri, runs)


def test_the_suite_field_chooses_the_analysis_and_its_reference(store, tmp_path):
    trials, results = store
    sections = {s.markdown.splitlines()[0]: s for s in analyses.run_analyses(trials, results, tmp_path)}
    steps = sections["### plain_name — steps to reach base's final val_loss (lower is better)"]
    assert "| base | 20 of 20 |" in steps.markdown and "| other | 10 of 20 |" in steps.markdown
    assert steps.files == [tmp_path / "plain_name_steps_to_base.md"]
    memory = sections["### mem — val_perplexity against optimizer memory"].markdown
    assert "| vs small |" in memory
    assert "| smoke | big lr=0.004 | 30 | 0.0 MiB | 2.00× |" in memory
    assert "| smoke | small lr=0.005 | 30 | 0.0 MiB | 1.00× |" in memory
    assert not any("spikes_by_name_only" in title for title in sections)  # a name prefix alone chooses nothing


def test_sweep_learning_rates_come_from_the_trials_not_the_column_label(store):
    trials, results = store
    tables = {t.name: t for t in leaderboard.build_tables(trials, results)}
    assert sorted(tables["mem"].lrs.values()) == [4e-3, 4e-3, 5e-3, 5e-3]
    assert tables["spikes_by_name_only"].lrs == {}  # "lr=5" in a column name is a label, not a grid


def test_one_outcome_rule(tmp_path):
    (trial,) = [t for t in trials_of(tmp_path, SUITE) if t.table == "spikes_by_name_only"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'o.db'}")
    exp = client.create_experiment("o", artifact_location=str(tmp_path / "artifacts"))
    cases = {
        "finished": (record(client, exp, "finished", {"final.m": [(0, 2.5)]}), ("finished", 2.5)),
        "finished without the metric": (record(client, exp, "finished", {}), ("missing", None)),
        "diverged": (record(client, exp, "diverged", {"final.m": [(0, 9.0)]}), ("diverged", None)),
        "failed": (record(client, exp, "failed", {}), ("failed", None)),
        "running": (record(client, exp, "running", {}), ("missing", None)),
        "no run": (None, ("missing", None)),
    }
    texts = {}
    for name, (run, expected) in cases.items():
        results = Results(client.tracking_uri, {trial.key: run} if run else {})
        assert results.outcome(trial, "m") == expected, name
        texts[name] = results.cell([trial], "m").text()
    assert texts == {"finished": "2.5", "finished without the metric": "pending", "diverged": "diverged",
                     "failed": "failed", "running": "pending", "no run": "pending"}


def test_analysis_and_reference_leave_the_trial_identity_alone(tmp_path):
    plain = SUITE.replace("    analysis: steps\n    reference: base\n", "").replace(
        "    analysis: memory\n    reference: small\n", "")
    assert [t.key for t in trials_of(tmp_path, plain)] == [t.key for t in trials_of(tmp_path, SUITE)]
    assert {t.reference for t in trials_of(tmp_path, plain)} == {"adam"}
