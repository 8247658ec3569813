"""Bad input fails fast: a clear one-paragraph error, exit code 2, no traceback, nothing written, before Ray starts."""

from __future__ import annotations

import sys

import pytest

GOOD = """\
name: t
experiments:
  - task: llm_pretrain
    preset: smoke
    hparams: {lr: 1e-3}
    optimizers: [adamw]
"""

CASES = {
    "unknown suite": (["run", "--suite", "nope"], None, "unknown suite 'nope'; valid suites:"),
    "malformed yaml": (["run", "--suite", "{f}"], "name: t\nexperiments: [\n", "malformed YAML"),
    "unknown task": (["run", "--suite", "{f}"], GOOD.replace("llm_pretrain", "nope"), "unknown task 'nope'"),
    "unknown optimizer": (["run", "--suite", "{f}"], GOOD.replace("[adamw]", "[adamz]"), "unknown optimizer 'adamz'"),
    "unknown hparam": (["run", "--suite", "{f}"], GOOD.replace("lr: 1e-3", "lrr: 1e-3"), "no hyperparameter 'lrr'"),
    "negative lr": (["run", "--suite", "{f}"], GOOD.replace("lr: 1e-3", "lr: -1e-3"), "rejects"),
    "wrong type": (["run", "--suite", "{f}"], GOOD + "    seeds: abc\n", "seeds"),
    "bad override": (["run", "--suite", "{f}", "--set", "task.steps=-3"], GOOD, "steps"),
    "bad set syntax": (["run", "--suite", "smoke", "--set", "steps"], None, "bad --set"),
    "sweep bad lr": (["sweep", "--task", "llm_pretrain", "--optimizer", "adamw", "--lr", "abc"], None, "--lr"),
    "sweep unknown task": (["sweep", "--task", "nope", "--optimizer", "adamw"], None, "unknown task 'nope'"),
    "unreachable tracking server": (["run", "--suite", "{f}", "--tracking-uri", "http://127.0.0.1:9"], GOOD,
                                    "does not answer"),
    "ray address not answering": (["run", "--suite", "{f}", "--address", "127.0.0.1:9"], GOOD,
                                  "could not connect to Ray"),
    "leaderboard without runs": (["leaderboard"], None, "no suite has runs"),
    "warmup longer than reset interval": (
        ["run", "--suite", "{f}"], GOOD.replace("[adamw]", "[{name: spam, hparams: {warmup_steps: 1000}}]"),
        "warmup"),
    "hparam of the wrong type": (["run", "--suite", "{f}"], GOOD.replace("lr: 1e-3", "lr: fast"), "rejects"),
    "missing data path": (["run", "--suite", "{f}", "--set", "task.c4_path=/no/such/c4"], GOOD,
                          "'/no/such/c4' does not exist"),
    "unknown preset": (["run", "--suite", "{f}"], GOOD.replace("preset: smoke", "preset: huge"), "unknown preset"),
    "malformed --set value": (["run", "--suite", "smoke", "--set", "task.steps=[1"], None, "not valid YAML"),
    "unknown leaderboard format": (["leaderboard", "--format", "xml"], None, "xml"),
    "unknown list target": (["list", "widgets"], None, "widgets"),
    "negative max-concurrent": (["run", "--suite", "smoke", "--max-concurrent", "-1"], None, "--max-concurrent"),
    "unknown benchmark": (["perf", "gpus"], None, "gpus"),
    "unknown throughput variant": (["perf", "train", "--variants", "turbo"], None, "unknown variant(s) turbo; valid:"),
    "task set no task has": (["run", "--suite", "smoke", "--set", "task.workerz=2"], None,
                             "no task of this suite has a field 'workerz'"),
    "unknown --only table": (["run", "--suite", "smoke", "--only", "llm_pretrain,tabel9"], None,
                             "no table or task 'tabel9' in this suite; valid:"),
    "zero seeds in sweep": (["sweep", "--task", "llm_pretrain", "--optimizer", "adamw", "--seeds", "0"], None,
                            "--seeds"),
}


def run_cli(args: list[str], root, monkeypatch, capsys) -> tuple[int, str, str]:
    """`bench ARGS` in this process (the console entry point, with its exit code), from `root`."""
    from bench import cli

    monkeypatch.chdir(root)
    monkeypatch.setenv("BENCH_HOME", str(root / ".bench"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", ["bench", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(tmp_path, monkeypatch, capsys, case):
    args, text, needle = CASES[case]
    if text is not None:
        (tmp_path / "bad.yaml").write_text(text)
    args = [a.replace("{f}", str(tmp_path / "bad.yaml")) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(args, tmp_path, monkeypatch, capsys)
    assert code == 2, out + err
    assert needle in " ".join(err.split()), err
    assert "Traceback" not in err + out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no store, no results


@pytest.mark.slow
def test_console_command_exit_code(bench):
    result = bench("run", "--suite", "nope")
    assert result.returncode == 2 and "unknown suite 'nope'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_debug_shows_traceback(bench):
    result = bench("--debug", "run", "--suite", "nope")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_list_and_dry_run(bench):
    tasks = bench("list", "tasks")
    assert tasks.returncode == 0 and "llm_pretrain" in tasks.stdout
    opts = bench("list", "optimizers")
    assert opts.returncode == 0 and "stable_spam" in opts.stdout and "spam" in opts.stdout
    dry = bench("run", "--suite", "paper", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "GPU-hours" in dry.stdout and "llama_1b" in dry.stdout
    assert not (bench.root / ".bench").exists() and not (bench.root / "results").exists()
