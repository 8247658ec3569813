"""The order trials start in: each task configuration's first trial, then the rest (`bench.runner.dispatch_order`)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from bench.runner import dispatch_order
from bench.spec import TrialSpec
from tests.conftest import Bench


def spec(config: dict, optimizer: str, seed: int = 0, task: str = "llm_pretrain") -> TrialSpec:
    return TrialSpec(task=task, preset="p", config=config, optimizer=optimizer, seed=seed)


def test_each_configurations_first_trial_comes_first_then_the_rest_in_suite_order() -> None:
    bf16, fp4, lora = {"quant": "none"}, {"quant": "fp4"}, {"method": "lora"}
    specs = [spec(bf16, "adam"), spec(bf16, "spam"), spec(bf16, "adam", 1), spec(fp4, "adam"), spec(fp4, "spam"),
             spec(lora, "adamw", task="finetune"), spec(lora, "spam", task="finetune"),
             spec(bf16, "stable_spam")]  # a later table of the first configuration
    ordered = dispatch_order(specs)
    assert [(s.config, s.optimizer, s.seed) for s in ordered] == [
        (bf16, "adam", 0), (fp4, "adam", 0), (lora, "adamw", 0),
        (bf16, "spam", 0), (bf16, "adam", 1), (fp4, "spam", 0), (lora, "spam", 0), (bf16, "stable_spam", 0)]
    assert sorted(s.key() for s in ordered) == sorted(s.key() for s in specs)  # every trial, once


def test_the_same_config_of_another_task_is_another_configuration() -> None:
    same = {"steps": 10}
    ordered = dispatch_order([spec(same, "adam"), spec(same, "spam"), spec(same, "adam", task="forecasting")])
    assert [(s.task, s.optimizer) for s in ordered] == [("llm_pretrain", "adam"), ("forecasting", "adam"),
                                                        ("llm_pretrain", "spam")]


SUITE = """
name: order
experiments:
  - {task: llm_pretrain, preset: smoke, table: short, overrides: {steps: 10}, optimizers: [adamw, spam]}
  - {task: llm_pretrain, preset: smoke, table: long, overrides: {steps: 12}, optimizers: [adamw, spam]}
"""


@pytest.mark.slow
def test_ray_tune_starts_the_trials_in_that_order(tmp_path) -> None:
    """One trial at a time, so the order they end in is the order Tune started them in."""
    (tmp_path / "order.yaml").write_text(SUITE)
    b = Bench(tmp_path / "home")
    b.root.mkdir()
    result = b("run", "--suite", str(tmp_path / "order.yaml"), "--max-concurrent", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(b.uri)
    exp = [e.experiment_id for e in client.search_experiments() if e.name == "bench-order"]
    runs = [r for r in client.search_runs(exp) if r.data.tags.get("bench.role") == "trial"]
    ended = sorted(runs, key=lambda r: r.info.end_time)
    assert [(r.data.tags["bench.table"], r.data.tags["bench.optimizer"]) for r in ended] == [
        ("short", "adamw"), ("long", "adamw"), ("short", "spam"), ("long", "spam")]
