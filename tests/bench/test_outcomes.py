"""What a run reports is what happened: exit codes, run states, Ctrl-C, trial folders that belong to one run
(the real `bench` command, real Ray Tune, real MLflow store, smoke-sized training)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import Bench

pytestmark = pytest.mark.slow

SUITE = """\
name: NAME
experiments:
  - task: llm_pretrain
    preset: smoke
    table: TABLE
    overrides: OVERRIDES
    hparams: {lr: 3e-3}
    optimizers: [adamw]
"""


def write(b: Bench, name: str, overrides: str, table: str = "t") -> str:
    b.root.mkdir(parents=True, exist_ok=True)
    path = b.root / f"{name}.yaml"
    path.write_text(SUITE.replace("NAME", name).replace("TABLE", table).replace("OVERRIDES", overrides))
    return str(path)


def trial_runs(b: Bench, experiment: str) -> list:
    c = MlflowClient(b.uri)
    exp = c.get_experiment_by_name(experiment)
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("bench.role") == "trial"]


def test_a_failed_trial_fails_the_command_and_its_run(tmp_path):
    b = Bench(tmp_path)
    suite = write(b, "broken", "{steps: 8, tokenizer: no-such-org/no-such-tokenizer}")
    result = b("run", "--suite", suite)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "failed: llm_pretrain/smoke adamw" in " ".join(result.stderr.split())
    (run,) = trial_runs(b, "bench-broken")
    assert run.info.status == "FAILED"
    assert run.data.tags["bench.status"] == "failed" and "OSError" in run.data.tags["bench.error"]
    assert "| failed" in (b.root / "results" / "broken" / "t.md").read_text()


def test_a_new_experiment_never_inherits_another_runs_progress(tmp_path):
    b = Bench(tmp_path)
    overrides = "{steps: 12, checkpoint_every: 4, eval_every: 6, log_every: 2}"
    first = b("run", "--suite", write(b, "first", overrides))
    assert first.returncode == 0, first.stderr[-3000:]
    assert not list((b.home / "trials").iterdir())  # a finished trial leaves no checkpoint behind
    # the same trial in another experiment: a new child run, trained whole, with its own complete curve
    second = b("run", "--suite", write(b, "second", overrides))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" not in second.stdout
    (run,) = trial_runs(b, "bench-second")
    steps = sorted(m.step for m in MlflowClient(b.uri).get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(2, 13, 2))
    assert "bench.resumed_from_step" not in run.data.tags


def test_ctrl_c_interrupts_resumably_and_the_rerun_says_where_it_resumed(tmp_path):
    b = Bench(tmp_path)
    suite = write(b, "long", "{steps: 60, checkpoint_every: 5, eval_every: 30, log_every: 5}")
    log = b.root / "run.log"
    with log.open("w") as out:  # a new session, so that the signal reaches every process, as Ctrl-C in a terminal
        proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--suite", suite], cwd=b.root, env=b.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while not list(b.home.glob("trials/*/checkpoint.pt")) and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
    text = " ".join(log.read_text().split())
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted: 1 trials resumable — run the same command to resume" in text
    assert "Tuner.restore" not in text and "Traceback" not in text
    (run,) = trial_runs(b, "bench-long")
    assert run.data.tags["bench.status"] == "interrupted" and run.info.status == "KILLED"
    again = b("run", "--suite", suite)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed llm_pretrain/smoke adamw(lr=0.003) seed=0 from step" in " ".join(again.stdout.split())
    (run,) = trial_runs(b, "bench-long")
    steps = sorted(m.step for m in MlflowClient(b.uri).get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(5, 61, 5))
