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



def TABLE(name: str) -> str:  # noqa: N802 - reads as a constant of the cases below
    return GOOD.replace("preset: smoke", f"preset: smoke\n    table: {name}")


# a "billion laughs": 10**9 values once its anchors are expanded, a few hundred bytes as written
LAUGHS = "name: t\nx-0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"x-{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
) + GOOD.split("\n", 1)[1].replace("lr: 1e-3", "lr: *a8")
BOMB = "[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(
    f"&{c} [{','.join([f'*{p}'] * 10)}]" for p, c in zip("abcd", "bcde", strict=True)
) + ", [" + ",".join(["*e"] * 10) + "]]"

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
    "table name leaving --out": (["run", "--suite", "{f}"], TABLE("../../escape"),
                                 "experiments.0.table: Value error, '../../escape' cannot name files"),
    "suite name leaving BENCH_HOME": (["run", "--suite", "{f}"], GOOD.replace("name: t", "name: ../../t"),
                                      "name: Value error, '../../t' cannot name files"),
    "table name too long": (["run", "--suite", "{f}"], TABLE("x" * 300), "cannot name files: use 1 to 100 letters"),
    "sweep name leaving --out": (["sweep", "--task", "llm_pretrain", "--optimizer", "adamw", "--name", "../up"], None,
                                 "cannot name files"),
    "billion laughs": (["run", "--suite", "{f}", "--dry-run"], LAUGHS, "expands to more than 100000 values"),
    "deeply nested list": (["run", "--suite", "{f}"], "name: t\nexperiments: " + "[" * 100_000 + "]" * 100_000 + "\n",
                           "nested too deeply"),
    "anchor bomb in --set": (["run", "--suite", "smoke", "--dry-run", "--set", "hparams.lr=" + BOMB], None,
                             "expands to more than 100000 values"),
    "malformed tracking uri": (["run", "--suite", "{f}", "--tracking-uri", "sqlite:/x.db"], GOOD,
                               "a SQLite store is written sqlite:///PATH"),
    "unwritable tracking uri": (["run", "--suite", "{f}", "--tracking-uri", "sqlite:////proc/x/mlflow.db"], GOOD,
                                "cannot create the store's folder /proc/x"),
    "unknown tracking scheme": (["run", "--suite", "{f}", "--tracking-uri", "ftp://h/x"], GOOD, "unsupported scheme"),
    "unknown analysis": (["run", "--suite", "{f}"], GOOD + "    analysis: spikez\n",
                         "unknown analysis 'spikez'; valid: spikes, memory, sensitivity, dynamics, steps"),
    "two analyses for one table": (["run", "--suite", "{f}"], GOOD + "    analysis: spikes\n" + GOOD.split("\n", 2)[2]
                                   + "    analysis: memory\n", "give `analysis` different values (memory, spikes)"),
    "reference that is no row": (["run", "--suite", "{f}"], GOOD + "    reference: sgd\n",
                                 "reference 'sgd' is not a row of table 'llm_pretrain'; rows: adamw"),
    "unknown --mps mode": (["run", "--suite", "smoke", "--mps", "maybe"], None, "maybe"),
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
    assert len(err) < 3000  # one paragraph, never an unbounded value


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


def test_a_second_run_on_the_same_store_names_the_first(tmp_path, monkeypatch, capsys):
    import subprocess
    import time

    (tmp_path / "good.yaml").write_text(GOOD)
    holder = subprocess.Popen(  # holds the lock exactly as a running `bench run --suite smoke` does
        [sys.executable, "-c", "import sys, time; from bench import tracking\n"
         "with tracking.run_lock(tracking.default_tracking_uri(), 'bench run --suite smoke'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        cwd=tmp_path, env={**__import__("os").environ, "BENCH_HOME": str(tmp_path / ".bench")},
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.strftime("%Y-%m-%d %H:")
        code, out, err = run_cli(["run", "--suite", str(tmp_path / "good.yaml")], tmp_path, monkeypatch, capsys)
    finally:
        holder.kill()
        holder.wait()
    text = " ".join(err.split())
    assert code == 2, out + err
    assert f"another bench run is using {tmp_path / '.bench'}: PID {holder.pid}, `bench run --suite smoke`, since "\
        f"{started}" in text, text
    assert "Traceback" not in err and not (tmp_path / ".bench" / "mlflow.db").exists()


TWO_TABLES = GOOD.replace("    optimizers: [adamw]\n", "    table: plain\n    optimizers: [adamw]\n") + """\
  - task: llm_pretrain
    preset: smoke
    table: galore
    hparams: {lr: 1e-3}
    optimizers: [galore_adamw]
"""


def test_only_checks_what_it_runs_and_a_missing_package_names_its_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # this machine as if bitsandbytes were not installed
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    (tmp_path / "two.yaml").write_text(TWO_TABLES)
    code, out, err = run_cli(["run", "--suite", str(tmp_path / "two.yaml"), "--only", "plain", "--dry-run"],
                             tmp_path, monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["run", "--suite", str(tmp_path / "two.yaml"), "--dry-run"], tmp_path, monkeypatch,
                             capsys)
    text = " ".join(err.split())
    assert code == 2, out + err
    assert "two.yaml:12: experiments.1.optimizers.0: optimizer 'galore_adamw' is unavailable because the module(s) " \
        "bitsandbytes are not installed; install it with: pip install 'bench[baselines]'" in text, text
    assert "experiments.0" not in text
