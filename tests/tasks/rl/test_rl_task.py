"""The RL task: registry optimizer inside SB3, benchmark lr schedule, test-return curve, seeding, SAC tags, resume."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("stable_baselines3")
pytest.importorskip("mujoco")

from pydantic import ValidationError  # noqa: E402

import optimizers  # noqa: E402
from tasks.base import Diverged, LocalContext  # noqa: E402
from tasks.rl.task import RLConfig, RLTask  # noqa: E402
from tasks.rl.trainer import RLTrial  # noqa: E402

TASK = RLTask()
# Two PPO updates of 256 steps per epoch, two passes of 4 minibatches each: about a second per epoch.
TINY = {"epochs": 2, "steps_per_epoch": 512, "n_steps": 256, "n_epochs": 2, "eval_episodes": 1}
SPAM_HPARAMS: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.99), "reset_interval": 7, "warmup_steps": 3}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """As in `RLTask.run`: small MLPs train fastest, and reproducibly, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides: Any) -> RLConfig:
    cfg = TASK.config("smoke", {**TINY, **overrides})
    assert isinstance(cfg, RLConfig)
    return cfg


def first_param_group_lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in opt.param_groups]


def test_policy_optimizer_is_the_registrys_with_requested_hparams() -> None:
    trial = RLTrial.create(tiny(), "spam", SPAM_HPARAMS, seed=0, device="cpu")
    try:
        opt = trial.model.policy.optimizer
        reference = optimizers.build("spam", [torch.nn.Parameter(torch.zeros(2))], **SPAM_HPARAMS)
        assert type(opt) is type(reference) and type(opt) is not torch.optim.Adam
        assert opt.registry_info.name == "spam"
        resolved = optimizers.resolved_hparams(opt)
        assert resolved == optimizers.resolved_hparams(reference)
        assert resolved["lr"] == 1e-3 and resolved["reset_interval"] == 7 and resolved["warmup_steps"] == 3
        assert tuple(resolved["betas"]) == (0.9, 0.99)
        params = {p for group in opt.param_groups for p in group["params"]}
        assert params == set(trial.model.policy.parameters())

        for _ in range(2):
            trial.train_epoch()
        assert trial.model.policy.optimizer is opt
        assert optimizers.resolved_hparams(opt) == resolved
        assert len(opt.state) > 0  # it took steps
    finally:
        trial.close()


@pytest.mark.slow
def test_lr_follows_the_benchmark_schedule_not_sb3s() -> None:
    cfg = tiny(lr_schedule="linear")
    trial = RLTrial.create(cfg, "adam", {"lr": 1e-3}, seed=0, device="cpu")
    try:
        trial.model.lr_schedule = lambda _progress: 123.0  # SB3's schedule: must never reach the optimizer
        total, rollout = cfg.total_env_steps(), cfg.steps_per_update()
        for epoch in (1, 2):
            metrics = trial.train_epoch()
            steps = trial.model.num_timesteps
            assert steps == epoch * cfg.steps_per_epoch
            # The last update of the epoch trained on data collected from env step `steps - rollout` on.
            expected = 1e-3 * (1 - (steps - rollout) / total)
            assert first_param_group_lrs(trial.model.policy.optimizer) == pytest.approx([expected])
            assert metrics["lr"] == pytest.approx(expected)
        assert expected > 0  # SB3's linear schedule would have reached 0 on the final update
    finally:
        trial.close()


def test_constant_schedule_keeps_the_trials_lr() -> None:
    trial = RLTrial.create(tiny(epochs=1), "adam", {"lr": 7e-4}, seed=0, device="cpu")
    try:
        trial.model.lr_schedule = lambda _progress: 123.0
        trial.train_epoch()
        assert first_param_group_lrs(trial.model.policy.optimizer) == [7e-4]
    finally:
        trial.close()


def test_requested_hparam_that_did_not_arrive_is_an_error() -> None:
    opt = optimizers.build("adam", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(RuntimeError, match="lr"):
        optimizers.verify(opt, "adam", {"lr": 2e-3})


def test_optimizer_not_built_by_the_registry_is_an_error() -> None:
    plain = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(RuntimeError, match="not the registry's"):
        optimizers.verify(plain, "adam", {}, where="SB3's policy.optimizer")
    spam = optimizers.build("spam", [torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(RuntimeError, match="registry 'spam'"):
        optimizers.verify(spam, "adam", {}, where="SB3's policy.optimizer")


def test_unknown_hparam_is_refused() -> None:
    with pytest.raises((TypeError, ValueError, KeyError)):
        TASK.run(tiny(), "adam", {"no_such_hparam": 1.0}, LocalContext(seed=0, device="cpu"))


def test_total_steps_is_filled_in_and_tagged() -> None:
    cfg = tiny()
    trial = RLTrial.create(cfg, "stable_spam", {}, seed=0, device="cpu")
    try:
        assert optimizers.resolved_hparams(trial.model.policy.optimizer)["total_steps"] == cfg.optimizer_steps()
        assert trial.tags()["task_filled_hparams"] == f"total_steps={cfg.optimizer_steps()}"
    finally:
        trial.close()


def test_non_finite_policy_is_reported_as_diverged() -> None:
    with pytest.raises(Diverged):
        TASK.run(tiny(epochs=1), "adam", {"lr": 1e30}, LocalContext(seed=0, device="cpu"))


@pytest.mark.slow
def test_smoke_run_reports_a_test_return_curve(tmp_path: Path) -> None:
    cfg = TASK.config("smoke")
    assert isinstance(cfg, RLConfig)
    ctx = LocalContext(seed=0, device="cpu", workdir=tmp_path)
    result = TASK.run(cfg, "adam", {}, ctx)

    curve = ctx.series("test_return")
    assert [step for step, _ in curve] == list(range(1, cfg.epochs + 1))
    assert all(math.isfinite(value) for _, value in curve)
    assert [v for _, v in ctx.series("env_steps")] == [cfg.steps_per_epoch * e for e in range(1, cfg.epochs + 1)]
    assert len(ctx.series("train_loss")) == cfg.epochs
    assert result["test_return"] == curve[-1][1]
    assert result[TASK.metric] == curve[-1][1]
    assert ctx.params["optimizer.lr"] == cfg.lr
    assert ctx.tags["lr_schedule"].startswith("benchmark constant")
    assert ctx.tags["registry_optimizers"] == "policy.optimizer"
    assert ctx.load_checkpoint()["epoch"] == cfg.epochs


@pytest.mark.slow
def test_same_seed_same_curve_on_cpu() -> None:
    def curves(seed: int) -> tuple[list, list]:
        ctx = LocalContext(seed=seed, device="cpu")
        TASK.run(tiny(), "adam", {}, ctx)
        return ctx.series("test_return"), ctx.series("train_loss")

    first = curves(3)
    assert curves(3) == first
    assert curves(4) != first


@pytest.mark.slow
def test_sac_uses_registry_for_actor_and_critic_and_tags_the_entropy_optimizer() -> None:
    cfg = TASK.config("smoke-sac", {"epochs": 2})
    assert isinstance(cfg, RLConfig)
    trial = RLTrial.create(cfg, "spam", SPAM_HPARAMS, seed=0, device="cpu")
    try:
        for opt in (trial.model.actor.optimizer, trial.model.critic.optimizer):
            assert opt.registry_info.name == "spam"
            assert optimizers.resolved_hparams(opt)["reset_interval"] == 7
        assert type(trial.model.ent_coef_optimizer) is torch.optim.Adam
        assert not hasattr(trial.model.ent_coef_optimizer, "registry_info")
    finally:
        trial.close()

    ctx = LocalContext(seed=0, device="cpu")
    TASK.run(cfg, "spam", SPAM_HPARAMS, ctx)
    assert "not the registry's" in ctx.tags["ent_coef_optimizer"]
    assert ctx.tags["registry_optimizers"] == "actor.optimizer, critic.optimizer"
    assert len(ctx.series("test_return")) == 2
    assert len(ctx.series("critic_loss")) == 2


def test_checkpoint_round_trip_restores_policy_and_optimizer(tmp_path: Path) -> None:
    cfg = tiny(epochs=1)
    ctx = LocalContext(seed=0, device="cpu", workdir=tmp_path)
    trial = RLTrial.create(cfg, "spam", SPAM_HPARAMS, seed=0, device="cpu")
    fresh = RLTrial.create(cfg, "spam", SPAM_HPARAMS, seed=1, device="cpu")
    try:
        trial.train_epoch()
        ctx.save_checkpoint({"trial": trial.state_dict()})
        fresh.load_state_dict(ctx.load_checkpoint()["trial"], epoch=1)
        assert fresh.model.num_timesteps == trial.model.num_timesteps
        for a, b in zip(fresh.model.policy.parameters(), trial.model.policy.parameters(), strict=True):
            assert torch.equal(a, b)
        saved, restored = trial.model.policy.optimizer.state_dict(), fresh.model.policy.optimizer.state_dict()
        assert saved["state"].keys() == restored["state"].keys()
        for key, state in saved["state"].items():
            for name, value in state.items():
                other = restored["state"][key][name]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other
        assert fresh.train_env.obs_rms.count == trial.train_env.obs_rms.count
    finally:
        trial.close()
        fresh.close()


def test_interrupted_run_resumes_from_its_last_epoch(tmp_path: Path) -> None:
    TASK.run(tiny(epochs=1), "adam", {}, LocalContext(seed=0, device="cpu", workdir=tmp_path))
    ctx = LocalContext(seed=0, device="cpu", workdir=tmp_path)
    result = TASK.run(tiny(epochs=2), "adam", {}, ctx)
    assert [step for step, _ in ctx.series("test_return")] == [2]
    assert ctx.tags["resumed_from_epoch"] == "1"
    assert result["env_steps"] == 2 * TINY["steps_per_epoch"]


def test_presets_protocol_and_resources() -> None:
    for preset in TASK.presets:
        TASK.config(preset)
    paper = TASK.config("paper")
    assert isinstance(paper, RLConfig)
    assert (paper.epochs, paper.steps_per_epoch, paper.total_env_steps()) == (100, 10_240, 1_024_000)
    assert paper.optimizer_steps() == 100 * 5 * 10 * 32  # rollouts x PPO passes x minibatches of 64
    assert paper.lr == 3e-4 and paper.lr_schedule == "constant" and paper.setting("normalize")
    assert TASK.resources(paper).gpus == 0 and TASK.resources(paper).cpus == 1
    assert TASK.resources(TASK.config("paper", {"device": "cuda"})).gpus == pytest.approx(0.1)
    assert TASK.estimate_flops(paper) == 0 and TASK.estimate_seconds(paper) > 0
    with pytest.raises(ValidationError, match="multiple"):
        TASK.config("paper", {"steps_per_epoch": 10_000})
    sac = TASK.config("paper-sac")
    assert isinstance(sac, RLConfig)
    assert sac.optimizer_steps() == 1_000_000 - 10_000
