"""`bench run --dry-run` against a store that holds some of the suite's trials: it counts what is done and estimates
what is left, reading the store without writing to it."""

from __future__ import annotations

import sys

from bench import cli, tracking
from bench.suite import load_trials


def _store(uri: str, experiment: str, statuses: dict[str, str]) -> None:
    tracking.prepare_store(uri)
    exp_id = tracking.experiment_id(uri, experiment)
    c = tracking.client(uri)
    for key, status in statuses.items():
        c.create_run(exp_id, tags={tracking.KEY_TAG: key, tracking.STATUS_TAG: status})


def test_finished_keys_are_the_done_trials_only(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _store(uri, "bench-x", {"a": "finished", "b": "diverged", "c": "interrupted", "d": "running", "e": "failed"})
    assert tracking.finished_keys(uri, "bench-x") == {"a", "b"}
    assert tracking.finished_keys(uri, "bench-y") is None  # no such experiment (and none created)
    assert tracking.client(uri).get_experiment_by_name("bench-y") is None


def test_a_missing_store_is_not_created(tmp_path) -> None:
    db = tmp_path / "home" / "mlflow.db"
    assert tracking.finished_keys(f"sqlite:///{db}", "bench-x") is None
    assert not db.parent.exists()


def test_dry_run_counts_the_trials_left(tmp_path, monkeypatch, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, trials = load_trials("smoke", only={"llm_pretrain"})
    keys = sorted({t.key for t in trials})
    _store(uri, cli.experiment_name("smoke"), {keys[0]: "finished", keys[1]: "interrupted"})
    before = (tmp_path / "mlflow.db").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / ".bench"))
    monkeypatch.setattr(sys, "argv", ["bench", "run", "--suite", "smoke", "--only", "llm_pretrain", "--dry-run",
                                      "--tracking-uri", uri])
    try:
        cli.main()
    except SystemExit as exc:
        assert not exc.code
    out = " ".join(capsys.readouterr().out.split())
    assert f"1 of {len(keys)} distinct trials are already done" in out
    assert f"{len(keys) - 1} left" in out
    assert (tmp_path / "mlflow.db").stat().st_mtime_ns == before  # read only
