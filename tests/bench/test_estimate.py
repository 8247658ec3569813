"""Dry-run wall-time estimates: per-table subtotals, calibrated against the measured H200 mini runs."""

from __future__ import annotations

from bench.estimate import wall_minutes
from bench.suite import load_trials

# results/mini/README.md: the BF16 and 4-bit tables of `mini` (42 trials) took two GPU calls of about 480 s and
# 500 s of `bench run` each (the last two FP4 trials stopped near step 600 of 1000), about 16.5 minutes in all.
MEASURED_MINUTES = 16.5


def test_wall_time_has_per_table_subtotals_within_20_percent_of_the_measured_run() -> None:
    _, trials = load_trials("mini", only={"llm_pretrain_bf16", "llm_pretrain_4bit"})
    parts = wall_minutes(trials)
    assert set(parts) == {"llm_pretrain_bf16", "llm_pretrain_4bit"}
    assert parts["llm_pretrain_4bit"] > 2 * parts["llm_pretrain_bf16"]  # 24 4-bit trials, FP4 slower; 18 BF16
    assert abs(sum(parts.values()) - MEASURED_MINUTES) <= 0.2 * MEASURED_MINUTES, parts


def test_a_trial_listed_twice_counts_once() -> None:
    _, trials = load_trials("mini", only={"sensitivity_stable_spam"})  # its center trial is in all four columns
    assert len({t.key for t in trials}) < len(trials)
    assert wall_minutes(trials + trials) == wall_minutes(trials)
