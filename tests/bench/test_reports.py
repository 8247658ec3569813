"""Reports that say what they are: best marks, scale/model/like-for-like notes, one long-format CSV on stdout,
sweeps whose results stay findable. The store is a real MLflow SQLite store filled the way trials fill it."""

from __future__ import annotations

import csv
import dataclasses
import io

from bench import leaderboard, tracking
from bench.cli import experiment_name
from bench.suite import load_trials
from tests.bench.test_cli_errors import run_cli

SUITE = """\
name: rep
experiments:
  - task: llm_pretrain
    preset: smoke
    table: llm_pretrain_bf16
    column: llama_60m
    hparams: {lr: 1e-3}
    optimizers: [{name: adamw, label: adam}, spam]
    seeds: 2
"""
PERPLEXITY = {("adamw", 0): 40.0, ("adamw", 1): 42.0, ("spam", 0): 35.0, ("spam", 1): 37.0}


def fill_store(root, monkeypatch) -> tuple[str, list]:
    """A suite whose trials finished: runs with their final metric, as `run_trial` leaves them."""
    monkeypatch.setenv("BENCH_HOME", str(root / ".bench"))
    (root / "rep.yaml").write_text(SUITE)
    _, trials = load_trials(str(root / "rep.yaml"))
    uri = tracking.default_tracking_uri()
    tracking.prepare_store(uri)
    exp = tracking.experiment_id(uri, experiment_name("rep"))
    parent = tracking.start_parent(uri, exp, "rep", {})
    for t in trials:
        run = tracking.create_trial_run(uri, exp, parent, t.spec, tracking.trial_tags(t.table, t.row, t.spec))
        tracking.log_metrics(uri, run, [(40, "final.val_perplexity", PERPLEXITY[(t.spec.optimizer, t.spec.seed)], 0)])
        tracking.client(uri).set_tag(run, tracking.STATUS_TAG, "finished")
        tracking.client(uri).set_tag(run, "data_source", "offline text")
    return uri, trials


def test_tables_mark_the_best_and_say_what_they_are(tmp_path, monkeypatch):
    uri, trials = fill_store(tmp_path, monkeypatch)
    text, _ = leaderboard.write(trials, uri, experiment_name("rep"), tmp_path / "out")
    assert "| spam | **36 ± 1.414** |" in text and "| adam | 41 ± 1.414 |" in text  # lower perplexity is better
    assert "Scale: preset smoke. Model: LLaMA-tiny trained from scratch." in text
    assert "Not like for like with the (paper) columns: preset smoke is scaled down" in text
    assert "Not like for like" in (tmp_path / "out" / "llm_pretrain_bf16.md").read_text()


def test_csv_is_one_long_format_file(tmp_path, monkeypatch, capsys):
    fill_store(tmp_path, monkeypatch)
    code, out, err = run_cli(["leaderboard", "--suite", str(tmp_path / "rep.yaml"), "--format", "csv"], tmp_path,
                             monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))  # stdout is the CSV and nothing else
    assert list(rows[0]) == list(leaderboard.LONG_COLUMNS)
    ours = {r["row"]: r for r in rows if r["source"] == "ours"}
    assert float(ours["spam"]["value"]) == 36.0 and ours["spam"]["best"] == "1" and ours["adam"]["best"] == "0"
    paper = {r["row"]: float(r["value"]) for r in rows if r["source"] == "paper"}
    assert paper == {"adam": 34.09, "spam": 30.46}
    assert all(r["experiment"] == "bench-rep" for r in rows)
    assert "written to" in err and (tmp_path / "results" / "rep" / "leaderboard.csv").read_text() == out


def test_markdown_records_read_analysis_tables():
    md = "### spikes_x — spikes (fewer is better)\n\nnote\n\n| optimizer | col a | col b |\n|---|---|---|\n" \
         "| adam | 3 | 1.5 ± 0.2 |\n"
    records = leaderboard.markdown_records(md)
    assert records == [
        {"table": "spikes_x", "source": "analysis", "row": "adam", "column": "col a", "value": 3.0, "text": "3"},
        {"table": "spikes_x", "source": "analysis", "row": "adam", "column": "col b", "value": "",
         "text": "1.5 ± 0.2"}]


def test_sweep_results_are_findable_by_name(tmp_path, monkeypatch, capsys):
    """A sweep's suite is saved beside its results; `bench leaderboard --suite NAME` prints them again."""
    from bench import cli
    from bench.suite import Suite, yaml_load

    suite = Suite(**yaml_load(SUITE)).model_copy(update={"name": "sweep-llm_pretrain-smoke-abc123"})
    cli._save_sweep(suite, tmp_path / "results")
    uri, trials = fill_store(tmp_path, monkeypatch)
    exp = tracking.client(uri).get_experiment_by_name(experiment_name("rep"))
    tracking.client(uri).rename_experiment(exp.experiment_id, experiment_name(suite.name))
    code, out, err = run_cli(["leaderboard", "--suite", suite.name], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "**36 ± 1.414**" in out
    code, out, err = run_cli(["leaderboard"], tmp_path, monkeypatch, capsys)  # every suite with runs
    assert code == 0 and f"results/{suite.name}/" in " ".join(out.split()), err


def test_sweep_names_differ_by_what_they_sweep():
    from bench.cli import _sweep_name

    a = _sweep_name("llm_pretrain", "smoke", ["adamw"], [1e-3], 3, {})
    assert a.startswith("sweep-llm_pretrain-smoke-")
    assert a == _sweep_name("llm_pretrain", "smoke", ["adamw"], [1e-3], 3, {})
    assert a != _sweep_name("llm_pretrain", "smoke", ["adamw", "spam"], [1e-3], 3, {})
    assert a != _sweep_name("llm_pretrain", "smoke", ["adamw"], [1e-3], 3, {"task.steps": 10})


def test_the_model_note_comes_from_the_trials_that_ran(tmp_path, monkeypatch):
    """A table with trials still to run names the model its finished trials recorded, not 'not recorded'."""
    uri, trials = fill_store(tmp_path, monkeypatch)
    runs = {r.data.tags[tracking.KEY_TAG]: r for r in tracking.client(uri).search_runs(
        [tracking.experiment_id(uri, experiment_name("rep"))]) if tracking.KEY_TAG in r.data.tags}
    for run in runs.values():
        tracking.client(uri).set_tag(run.info.run_id, "model_source", "a pretrained checkpoint")
    runs = {k: tracking.client(uri).get_run(r.info.run_id) for k, r in runs.items()}
    extra = dataclasses.replace(trials[0], spec=trials[0].spec.model_copy(update={"seed": 7}))
    note = leaderboard.provenance([*trials, extra], runs, compared=False)[0]
    assert note == "Scale: preset smoke. Model: a pretrained checkpoint."
