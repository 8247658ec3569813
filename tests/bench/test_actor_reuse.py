"""Ray Tune runs trial after trial in one worker process: a trial there trains exactly as in a fresh process."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import Bench

pytestmark = pytest.mark.slow

SUITE = """
name: reuse
experiments:
  - task: llm_pretrain
    preset: smoke
    table: reuse
    overrides: {steps: 10}
    optimizers: [adamw, spam]
"""


def finished_runs(b: Bench) -> dict[str, dict]:
    runs = MlflowClient(b.uri).search_runs(
        [e.experiment_id for e in MlflowClient(b.uri).search_experiments() if e.name == "bench-reuse"])
    return {r.data.tags["bench.optimizer"]: r for r in runs if r.data.tags.get("bench.role") == "trial"}


def test_a_trial_in_a_reused_worker_equals_one_in_a_fresh_worker(tmp_path) -> None:
    """One trial at a time: the second runs in the first's worker. Two at a time: each in a fresh worker."""
    (tmp_path / "reuse.yaml").write_text(SUITE)
    one_by_one, side_by_side = Bench(tmp_path / "one_by_one"), Bench(tmp_path / "side_by_side")
    for b, concurrent in ((one_by_one, "1"), (side_by_side, "2")):
        b.root.mkdir()
        result = b("run", "--suite", str(tmp_path / "reuse.yaml"), "--max-concurrent", concurrent)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reused, fresh = finished_runs(one_by_one), finished_runs(side_by_side)
    assert set(reused) == set(fresh) == {"adamw", "spam"}
    assert len({r.data.tags["bench.worker_pid"] for r in reused.values()}) == 1
    assert len({r.data.tags["bench.worker_pid"] for r in fresh.values()}) == 2
    for optimizer in reused:
        for name in ("final.val_perplexity", "final.train_loss", "final.tokens"):
            assert reused[optimizer].data.metrics[name] == fresh[optimizer].data.metrics[name], (optimizer, name)
