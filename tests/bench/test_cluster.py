"""A Ray cluster started the way Ray's docs start one (`ray start --head`, Ray's defaults) serves `bench run
--address`; the terminal shows the progress and one plain line per trial; a rerun with nothing to do adds no run."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.bench.ray_cluster import RayCluster
from tests.bench.test_end_to_end import free_port

pytestmark = pytest.mark.slow

TINY = """\
name: tiny
experiments:
  - task: llm_pretrain
    preset: smoke
    table: tiny_table
    overrides: {steps: 6, eval_every: 3}
    hparams: {lr: 1e-3}
    optimizers: [{name: adamw, label: adam}]
"""


def test_cluster_started_with_ray_defaults(bench):
    cluster = RayCluster(bench.root, bench.env, free_port())
    cluster.env.pop("RAY_AUTH_MODE", None)
    bench.env = cluster.env
    (bench.root / "tiny.yaml").write_text(TINY)
    try:
        # A machine where Ray ran before has a token in ~/.ray/auth_token; `ray start --head` then turns
        # token authentication on by itself.
        cluster.ray("get-auth-token", "--generate")
        cluster.start_head("--num-cpus=1", "--include-dashboard=false")
        first = bench("run", "--suite", str(bench.root / "tiny.yaml"), "--address", cluster.address)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        again = bench("run", "--suite", str(bench.root / "tiny.yaml"), "--address", cluster.address)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    finally:
        cluster.stop()
    assert not cluster.processes()  # everything it started has ended

    out = " ".join(first.stdout.split())
    assert "done: tiny_table adam lr=0.001 seed=0: val_perplexity " in out, first.stdout
    assert "progress.py" not in out
    for noise in ("Token authentication", "INFO mlflow", "InvalidAuthToken"):
        assert noise not in first.stderr + again.stderr, first.stderr

    c = MlflowClient(bench.uri)
    exp = c.get_experiment_by_name("bench-tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's model-training view
    assert "mlflow.sharedViewState.leaderboard" in exp.tags  # the leaderboard view of the runs page
    (trial,) = c.search_runs([exp.experiment_id], "tags.`bench.role` = 'trial'")
    assert trial.info.run_name == "tiny_table adam lr=0.001 seed=0"
    assert trial.data.tags["bench.table"] == "tiny_table" and trial.data.tags["bench.label"] == "adam"
    parents = c.search_runs([exp.experiment_id], "tags.`bench.role` = 'parent'")
    assert len(parents) == 1  # the rerun had nothing to do and left no empty parent run
    assert "0 trials run, 1 already done" in " ".join(again.stdout.split())
