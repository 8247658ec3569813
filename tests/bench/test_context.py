"""The harness's trial context against a real MLflow store: metric points are durable before the checkpoint is."""

from __future__ import annotations

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
