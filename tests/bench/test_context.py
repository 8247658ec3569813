"""The harness's trial context against a real MLflow store: metric points are durable before the checkpoint is."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench import tracking
from bench.context import HarnessContext


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("the process died while writing the checkpoint")


@pytest.mark.slow
def test_points_reach_mlflow_before_the_checkpoint_exists(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    run_id = tracking.client(uri).create_run(tracking.experiment_id(uri, "ctx")).info.run_id
    ctx = HarnessContext(uri, run_id, tmp_path / "trial", seed=0, device="cpu", tune_report=False)
    for step in (5, 10):
        ctx.report(step, loss=1.0 / step)
    with pytest.raises(RuntimeError, match="died"):
        ctx.save_checkpoint({"step": 10, "blob": Unpicklable()})
    assert not (tmp_path / "trial" / "checkpoint.pt").exists()
    steps = [m.step for m in tracking.client(uri).get_metric_history(run_id, "loss")]
    assert sorted(steps) == [5, 10]  # a resume from the older checkpoint will skip them, not lose them

    again = HarnessContext(uri, run_id, tmp_path / "trial", seed=0, device="cpu", tune_report=False)
    for step in (5, 10, 15):
        again.report(step, loss=1.0 / step)
    again.save_checkpoint({"step": 15})
    steps = [m.step for m in tracking.client(uri).get_metric_history(run_id, "loss")]
    assert sorted(steps) == [5, 10, 15]
    assert again.load_checkpoint()["step"] == 15


STALLING_TRIAL = """
import sys, time
from pathlib import Path
from bench import tracking
from bench.context import HarnessContext
uri, folder, then = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
tracking.prepare_store(uri)
run_id = tracking.client(uri).create_run(tracking.experiment_id(uri, "stall")).info.run_id
ctx = HarnessContext(uri, run_id, folder, seed=0, device="cpu", tune_report=False, stall_s=2.0)
for step in range(1, 9):  # a report every 0.5 s for 4 s: longer than the 2 s, but never 2 s silent
    ctx.report(step, loss=1.0)
    time.sleep(0.5)
if then == "close":
    ctx.close()
def stuck_in_a_deadlock():
    time.sleep(4 if then == "close" else 60)
stuck_in_a_deadlock()
"""


@pytest.mark.slow
@pytest.mark.parametrize("then", ["hang", "close"])
def test_a_trial_silent_past_its_stall_limit_ends_with_its_stacks(tmp_path, then):
    """A hung trial's worker exits (status 1, so that Ray retries it), its stack in the log; one that reports keeps
    running, and a closed one may take as long as it likes."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STALLING_TRIAL, uri, str(tmp_path / "trial"), then],
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    if then == "hang":
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "stuck_in_a_deadlock" in proc.stderr and took < 45, (took, proc.stderr[-2000:])
    else:
        assert proc.returncode == 0 and "stuck_in_a_deadlock" not in proc.stderr, proc.stderr[-2000:]
