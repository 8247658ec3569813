"""Data-parallel trials: Ray Train workers (DDP over gloo) inside a real Ray Tune run, against the one-worker run,
and the fitting of trial requests to the resources of a local Ray instance."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from bench.runner import DRIVER_CPUS, ClusterError, fit_to_cluster
from bench.spec import TrialSpec
from tasks.llm_pretrain.config import PRESETS, LLMPretrainConfig

SUITE = """\
name: dp
x-short: &short {steps: 12, warmup_steps: 2, checkpoint_every: 6, eval_every: 6, log_every: 1}
experiments:
  - {task: llm_pretrain, preset: smoke, table: dp, column: w1, overrides: {<<: *short, workers: 1}, optimizers: [adamw]}
  - {task: llm_pretrain, preset: smoke, table: dp, column: w2, overrides: {<<: *short, workers: 2}, optimizers: [adamw]}
  - {task: llm_pretrain, preset: smoke, table: dp, column: nan, overrides: {<<: *short, workers: 2, inject_nan_at: 4},
     optimizers: [adamw]}
"""


def spec(seed: int = 0) -> TrialSpec:
    return TrialSpec(task="llm_pretrain", preset="smoke", config={"workers": 1}, optimizer="adamw", seed=seed)


@pytest.mark.slow
def test_two_workers_follow_the_one_worker_loss_curve(bench):
    bench.root.mkdir(exist_ok=True)
    (bench.root / "dp.yaml").write_text(SUITE)
    done = bench("run", "--suite", "dp.yaml", "--max-concurrent", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    c = MlflowClient(bench.uri)
    runs = c.search_runs([c.get_experiment_by_name("bench-dp").experiment_id], "tags.`bench.role` = 'trial'")
    by_column = {}
    for r in runs:
        cfg = r.data.params
        column = "nan" if cfg.get("task.inject_nan_at") not in (None, "None") else f"w{cfg['task.workers']}"
        by_column[column] = r
    assert set(by_column) == {"w1", "w2", "nan"}
    assert by_column["w2"].data.tags["bench.status"] == "finished"
    assert by_column["nan"].data.tags["bench.status"] == "diverged"  # every rank stopped; none hung
    curves = {k: sorted((m.step, m.value) for m in c.get_metric_history(by_column[k].info.run_id, "loss"))
              for k in ("w1", "w2")}
    assert [s for s, _ in curves["w2"]] == list(range(1, 13))
    assert [v for _, v in curves["w2"]] == pytest.approx([v for _, v in curves["w1"]], rel=1e-5)
    assert by_column["w2"].data.metrics["final.val_loss"] == pytest.approx(
        by_column["w1"].data.metrics["final.val_loss"], rel=1e-5)
    assert by_column["w2"].data.metrics["final.tokens"] == by_column["w1"].data.metrics["final.tokens"]


def test_gpu_requests_run_on_cpus_when_the_cluster_has_no_gpu():
    fitted, notes = fit_to_cluster([spec()], {spec().key(): {"cpus": 4, "gpus": 0.25}}, {"CPU": 2.0})
    assert fitted[spec().key()] == {"cpus": 2.0, "gpus": 0.0, "workers": 1}
    assert notes and "run on CPUs" in notes[0]


def test_data_parallel_workers_take_whole_gpus_and_leave_room_for_the_driver():
    fitted, notes = fit_to_cluster([spec()], {spec().key(): {"cpus": 4, "gpus": 0.5, "workers": 2}},
                                   {"CPU": 6.0, "GPU": 2.0})
    assert fitted[spec().key()] == {"cpus": (6.0 - DRIVER_CPUS) / 2, "gpus": 1.0, "workers": 2}
    assert not notes


def test_too_few_gpus_is_an_error_naming_the_trial_and_the_way_out():
    with pytest.raises(ClusterError, match=r"has 1 GPUs.*needs 4 GPUs \(4 workers\).*--set task.workers=1"):
        fit_to_cluster([spec()], {spec().key(): {"cpus": 4, "gpus": 1, "workers": 4}}, {"CPU": 16.0, "GPU": 1.0})


def test_workers_must_split_the_micro_batches_evenly():
    with pytest.raises(ValueError, match="4 micro-batches of a step .* do not split evenly over 3 workers"):
        LLMPretrainConfig(batch_size=256, micro_batch_size=64, workers=3)


def test_the_large_paper_presets_are_data_parallel():
    assert PRESETS["paper-350m"]["workers"] == 2 and PRESETS["paper-1b"]["workers"] == 4
    for preset in PRESETS.values():
        LLMPretrainConfig(**preset)  # every preset's workers split its micro-batches
