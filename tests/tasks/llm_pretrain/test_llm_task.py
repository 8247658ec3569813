"""End-to-end runs of the smoke preset on CPU: training, evaluation, fallback reporting, low-bit, resume, divergence."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import optimizers
from tasks.base import Diverged, LocalContext


def timed(metric: str) -> bool:
    """Metrics that measure time, which no two runs share."""
    return metric in ("tokens_per_sec", "positions_per_sec") or metric.startswith("time.")


def falls(run: Any, by: float = 0.5) -> bool:
    losses = run.losses()
    return len(losses) >= 4 and losses[-1] < losses[0] - by


def test_smoke_trains_and_evaluates(smoke_run: Any) -> None:
    r = smoke_run.result
    assert falls(smoke_run), smoke_run.losses()
    assert {"val_perplexity", "val_loss", "train_loss", "steps", "tokens"} <= set(r)
    assert math.isfinite(r["val_perplexity"]) and r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))
    assert r["steps"] == 40
    assert [s for s, _ in smoke_run.ctx.series("val_perplexity")] == [20, 40]
    for name in ("loss", "lr", "grad_norm", "tokens"):
        assert [s for s, _ in smoke_run.ctx.series(name)] == list(range(5, 41, 5))
    tokens = [v for _, v in smoke_run.ctx.series("tokens")]
    assert tokens == sorted(tokens) and tokens[-1] == r["tokens"]
    seconds = {p: [v for _, v in smoke_run.ctx.series(f"time.{p}_s")] for p in ("setup", "first_step", "eval",
                                                                               "checkpoint")}
    assert all(len(v) == 1 and v[0] > 0 for v in seconds.values()), seconds  # two evaluations, one checkpoint


def test_learning_rate_schedule_reaches_the_optimizer(smoke_run: Any) -> None:
    lrs = dict(smoke_run.ctx.series("lr"))
    peak = 3e-3  # the smoke preset's lr, 4 warmup steps, cosine to 10% over 40 steps
    assert lrs[5] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0 / 36))))
    assert lrs[40] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 35 / 36))))
    assert smoke_run.ctx.params["opt.lr"] == pytest.approx(peak)
    assert smoke_run.ctx.params["opt.weight_decay"] == 0.0


def test_offline_fallback_is_announced_and_tagged(smoke_run: Any) -> None:
    warnings = [r.getMessage() for r in smoke_run.logs if r.levelname == "WARNING"]
    assert any("C4 not reachable" in w and "t5-base tokenizer not reachable" in w for w in warnings), warnings
    tags = smoke_run.ctx.tags
    assert tags["data_source"] == "offline:wikipedia+shakespeare+kjv"
    assert tags["tokenizer"].startswith("bpe-2048")
    assert smoke_run.ctx.params["model.vocab_size"] == 2048


def test_fallback_is_packed_and_the_data_budget_is_logged(smoke_run: Any) -> None:
    params, r = smoke_run.ctx.params, smoke_run.result
    assert params["data.packing"] is True
    assert all(v >= 0.97 for _, v in smoke_run.ctx.series("real_token_fraction"))
    assert r["real_token_fraction"] == 1.0 and r["tokens"] == 40 * 8 * 64
    for (_, real), (_, everything) in zip(smoke_run.ctx.series("tokens_per_sec"),
                                          smoke_run.ctx.series("positions_per_sec"), strict=True):
        assert real == everything > 0
    assert params["data.train_tokens"] == 40 * 8 * 64 and params["data.corpus_tokens_source"] == "counted"
    assert params["data.corpus_tokens"] > 1_000_000
    assert params["data.passes"] == round(40 * 8 * 64 / params["data.corpus_tokens"], 4)
    assert r["data_passes"] == pytest.approx(40 * 8 * 64 / params["data.corpus_tokens"])
    assert smoke_run.ctx.tags["data_epochs"] == "single pass"


@pytest.mark.slow
def test_mini_preset_states_its_passes_over_the_fallback() -> None:
    from tasks.llm_pretrain import LLMPretrainTask
    from tasks.llm_pretrain.data import prepare_data
    from tasks.llm_pretrain.task import data_budget

    cfg = LLMPretrainTask().config("mini", {"data_source": "offline", "tokenizer": "bpe"})
    corpus, tokenizer = prepare_data(cfg.data_settings(), seed=0)
    budget = data_budget(cfg, corpus.packing, corpus.size(tokenizer))
    passes = budget["params"]["data.passes"]
    assert budget["tags"]["data_epochs"] == ("single pass" if passes <= 1 else "multi-epoch")
    assert passes <= 3  # a few passes over the default corpus at most; one over the large one
    assert cfg.seq_len == 256 and cfg.compile and cfg.steps >= 2 * 500  # SPAM's reset acts at least once


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spam", "stable_spam"])
def test_spike_aware_optimizers_train(run_task: Callable, name: str) -> None:
    if name not in optimizers.available():
        pytest.skip(f"optimizer {name!r} is not registered")
    run = run_task(optimizer=name)
    assert falls(run), run.losses()
    assert math.isfinite(run.result["val_perplexity"])
    if "total_steps" in optimizers.spec(name).accepts:
        assert run.ctx.params["opt.total_steps"] == 40


@pytest.mark.slow
def test_int4_quantized_llama_trains(run_task: Callable) -> None:
    run = run_task({"quant": "int4", "quant_group_size": 32})
    assert run.ctx.params["model.quantized_linears"] == 14
    assert falls(run), run.losses()
    assert math.isfinite(run.result["val_perplexity"])


class Killed(Exception):
    pass


class KilledAfterCheckpoint(LocalContext):
    """Dies right after its first checkpoint is written, as a killed trial would."""

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        super().save_checkpoint(state)
        raise Killed


@pytest.mark.slow
@pytest.mark.parametrize(("name", "extra"), [("adamw", {}), ("stable_spam", {"spike_monitor": True, "packing": True})])
def test_resume_from_checkpoint_equals_an_uninterrupted_run(run_task: Callable, tmp_path: Path, name: str,
                                                            extra: dict) -> None:
    if name not in optimizers.available():
        pytest.skip(f"optimizer {name!r} is not registered")
    overrides = {"steps": 30, "checkpoint_every": 10, "eval_every": 15, "log_every": 5, **extra}
    full = run_task(overrides, name, ctx=LocalContext(seed=3, device="cpu", workdir=tmp_path / "full"))
    with pytest.raises(Killed):
        run_task(overrides, name, ctx=KilledAfterCheckpoint(seed=3, device="cpu", workdir=tmp_path / "resumed"))
    resumed = run_task(overrides, name, ctx=LocalContext(seed=3, device="cpu", workdir=tmp_path / "resumed"))
    assert resumed.result == full.result  # bitwise: same data position, weights, optimizer state
    after = [(s, k, v) for s, k, v in full.ctx.metrics if s > 10 and not timed(k)]
    assert [(s, k, v) for s, k, v in resumed.ctx.metrics if not timed(k)] == after


@pytest.mark.slow
def test_local_c4_resumes_at_the_same_batch(run_task: Callable, tmp_path: Path, write_c4_shards: Callable) -> None:
    """C4 json.gz shards in the allenai/c4 layout, end to end: tokenizer, truncate-and-pad batches, a run killed
    after its checkpoint resumes at the same batch (bitwise the same results)."""
    write_c4_shards(tmp_path)
    overrides = {"c4_path": str(tmp_path), "tokenizer": "bpe", "bpe_train_docs": 300, "steps": 50,
                 "checkpoint_every": 10, "eval_every": 25, "log_every": 5, "c4_shuffle_buffer": 50}
    full = run_task(overrides, ctx=LocalContext(seed=2, device="cpu", workdir=tmp_path / "full"))
    assert full.ctx.tags["data_source"] == f"c4:local:{tmp_path.name}" and full.ctx.params["data.packing"] is False
    assert full.ctx.params["data.passes"] == round(50 * 8 / 300, 4) and full.ctx.tags["data_epochs"] == "multi-epoch"
    with pytest.raises(Killed):
        run_task(overrides, ctx=KilledAfterCheckpoint(seed=2, device="cpu", workdir=tmp_path / "resumed"))
    resumed = run_task(overrides, ctx=LocalContext(seed=2, device="cpu", workdir=tmp_path / "resumed"))
    assert resumed.result == full.result
    assert [m for m in resumed.ctx.metrics if not timed(m[1])] == \
        [m for m in full.ctx.metrics if m[0] > 10 and not timed(m[1])]


def test_injected_nan_ends_the_trial(run_task: Callable) -> None:
    ctx = LocalContext(seed=0, device="cpu")
    with pytest.raises(Diverged):
        run_task({"steps": 12, "inject_nan_at": 7, "eval_every": 100, "checkpoint_every": 0}, ctx=ctx)
    assert math.isnan(ctx.series("loss")[-1][1]) and ctx.series("loss")[-1][0] == 10


def test_spike_monitor_metrics_are_reported(run_task: Callable) -> None:
    if not hasattr(optimizers, "SpikeMonitor"):
        pytest.skip("optimizers.SpikeMonitor is not available")
    run = run_task({"steps": 10, "spike_monitor": True, "eval_every": 10, "checkpoint_every": 0})
    logged = {k for _, k, _ in run.ctx.metrics}
    assert {"spikes/total", "max_gss/total", "spikes/attention", "spikes/mlp"} <= logged
