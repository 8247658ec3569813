"""The stable-baselines3 side of the RL task: PPO/SAC with a registry optimizer and the benchmark's lr schedule.

How the optimizer under test is made to be the one that trains:

- SB3 builds its optimizers itself, as `optimizer_class(params, lr=lr_schedule(1), **optimizer_kwargs)`. We pass
  `optimizers.optimizer_class(name, **hparams)` as `policy_kwargs["optimizer_class"]` (with the trial's `lr` as
  SB3's learning rate; constructing that class returns `optimizers.build(name, params, ...)`), then check that every
  optimizer SB3 built carries the registry's `registry_info` for that name and that `optimizers.resolved_hparams`
  reports every requested hyperparameter. PPO has one (`policy.optimizer`); SAC has
  two (`actor.optimizer`, `critic.optimizer`) plus an entropy-coefficient optimizer that SB3 hard-codes to
  `torch.optim.Adam` — not the registry's, and tagged as such. As the other tasks do, an optimizer that accepts
  `total_steps` (Stable-SPAM) and is not given one gets the trial's optimizer-step count (tag `task_filled_hparams`).
- SB3 rewrites every param group's lr at the start of each `train()` from its own schedule, a function of the
  progress *within the current `learn()` call*. `ScheduledPPO`/`ScheduledSAC` replace that hook: each group's lr is
  set to its initial lr times the benchmark schedule's factor, a function of the env steps collected before the
  data being trained on (the cleanrl convention: the first update uses the full lr, the last a small positive one).
  SB3's own schedule is never consulted after the optimizers are built. All SB3-managed optimizers (SAC's
  entropy-coefficient Adam included) follow the benchmark schedule.
- After each epoch the optimizers are checked again: still the same objects, lrs equal to the schedule's.

Checkpoints (every epoch) hold the policy weights (with SAC's target critic), every optimizer's state, SAC's entropy
coefficient, the env-step/update counters, the VecNormalize statistics and the torch/numpy/python RNG states. Not
resumed: episodes in progress (the training envs start new episodes, reseeded from the seed and the epoch), the
evaluation env's RNG stream, and SAC's replay buffer (a resumed SAC trial refills it from the current policy while it
keeps training). A resumed trial therefore continues the same training but is not bit-identical to an uninterrupted
one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, sync_envs_normalization

from tasks.base import Diverged, TrialContext, TrialOptimizer, rng_state, set_rng_state, trial_device, trial_optimizer
from tasks.rl.task import RLConfig

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 10_000  # evaluation env seed = trial seed + this (training envs use seed .. seed + n_envs - 1)
RESUME_SEED_STRIDE = 1_000_003  # training envs of a trial resumed at epoch e are reseeded with seed + e * this
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
SB3_ENT_COEF_OPTIMIZER = "torch.optim.Adam (SB3 internal, not the registry's; lr follows the benchmark schedule)"


@dataclass
class LRSchedule:
    """The benchmark's learning-rate schedule, applied to optimizers SB3 built (instead of SB3's schedule)."""

    kind: Literal["constant", "linear"]
    total_env_steps: int
    steps_per_update: int
    initial_lrs: dict[int, list[float]] = field(default_factory=dict)

    def factor(self, env_steps: int) -> float:
        """Multiplier of the initial lr for an update on data whose collection started at `env_steps`."""
        if self.kind == "constant":
            return 1.0
        return max(0.0, 1.0 - env_steps / self.total_env_steps)

    def factor_at(self, num_timesteps: int) -> float:
        """The factor SB3's `train()` gets when the model has collected `num_timesteps` env steps."""
        return self.factor(max(num_timesteps - self.steps_per_update, 0))

    def capture(self, opts: list[torch.optim.Optimizer]) -> None:
        """Remember each optimizer's initial per-group lrs (call once, right after SB3 built them)."""
        for opt in opts:
            self.initial_lrs[id(opt)] = [float(group["lr"]) for group in opt.param_groups]

    def apply(self, num_timesteps: int, opts: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> float:
        """Set every param group's lr for the coming update; returns the lr of the first group."""
        opts = opts if isinstance(opts, list) else [opts]
        factor = self.factor_at(num_timesteps)
        first = math.nan
        for opt in opts:
            if id(opt) not in self.initial_lrs:
                raise RuntimeError(f"{type(opt).__name__} was not built with the model: SB3 replaced an optimizer")
            for group, lr0 in zip(opt.param_groups, self.initial_lrs[id(opt)], strict=True):
                group["lr"] = lr0 * factor
            first = opts[0].param_groups[0]["lr"]
        return first


class ScheduledPPO(PPO):
    """PPO whose `train()` takes its learning rates from the benchmark's `LRSchedule`, not from SB3's schedule."""

    benchmark_lr: LRSchedule

    def _update_learning_rate(self, opts: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> None:
        self.logger.record("train/learning_rate", self.benchmark_lr.apply(self.num_timesteps, opts))


class ScheduledSAC(SAC):
    """SAC whose `train()` takes its learning rates from the benchmark's `LRSchedule`, not from SB3's schedule."""

    benchmark_lr: LRSchedule

    def _update_learning_rate(self, opts: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> None:
        self.logger.record("train/learning_rate", self.benchmark_lr.apply(self.num_timesteps, opts))


def make_envs(cfg: RLConfig, seed: int) -> tuple[VecEnv, VecEnv]:
    """Training envs (seeds seed..seed+n_envs-1) and a separate evaluation env (seed + EVAL_SEED_OFFSET).

    With observation normalization the evaluation env uses the training env's frozen observation statistics
    (synced before each evaluation) and reports raw rewards; Monitor wrappers record the true episode returns.
    """
    train_env: VecEnv = make_vec_env(cfg.env_id, n_envs=cfg.n_envs, seed=seed)
    eval_env: VecEnv = make_vec_env(cfg.env_id, n_envs=1, seed=seed + EVAL_SEED_OFFSET)
    if cfg.setting("normalize"):
        train_env = VecNormalize(train_env, gamma=cfg.gamma)
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False, gamma=cfg.gamma)
    return train_env, eval_env


def build_model(
    cfg: RLConfig, env: VecEnv, optimizer_cls: type[torch.optim.Optimizer], lr: float, seed: int, device: str
) -> BaseAlgorithm:
    """The SB3 algorithm, its optimizers built from `optimizer_cls` through `policy_kwargs` (SB3's hook)."""
    policy_kwargs: dict[str, Any] = {
        "net_arch": list(cfg.setting("net_arch")),
        "activation_fn": ACTIVATIONS[cfg.setting("activation")],
        "optimizer_class": optimizer_cls,
        "optimizer_kwargs": {},  # the hyperparameters are bound in the registry class; {} also stops SB3's eps=1e-5
    }
    common: dict[str, Any] = {
        "policy": "MlpPolicy",
        "env": env,
        "learning_rate": lr,
        "gamma": cfg.gamma,
        "batch_size": cfg.setting("batch_size"),
        "policy_kwargs": policy_kwargs,
        "seed": seed,
        "device": device,
        "verbose": 0,
    }
    if cfg.algo == "ppo":
        model: BaseAlgorithm = ScheduledPPO(
            n_steps=cfg.n_steps,
            n_epochs=cfg.n_epochs,
            gae_lambda=cfg.gae_lambda,
            clip_range=cfg.clip_range,
            ent_coef=cfg.ent_coef,
            vf_coef=cfg.vf_coef,
            max_grad_norm=math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm,
            **common,
        )
    else:
        model = ScheduledSAC(
            buffer_size=cfg.buffer_size,
            learning_starts=cfg.learning_starts,
            tau=cfg.tau,
            train_freq=cfg.train_freq,
            gradient_steps=cfg.gradient_steps,
            ent_coef="auto",
            **common,
        )
    # A logger without outputs: SB3 records its training statistics there and we read them after each epoch.
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def registry_optimizers(model: BaseAlgorithm) -> dict[str, torch.optim.Optimizer]:
    """The optimizers SB3 built from the registry class, by attribute path."""
    if isinstance(model, SAC):
        return {"actor.optimizer": model.actor.optimizer, "critic.optimizer": model.critic.optimizer}
    return {"policy.optimizer": model.policy.optimizer}


def sb3_internal_optimizers(model: BaseAlgorithm) -> dict[str, torch.optim.Optimizer]:
    """Optimizers SB3 builds on its own, outside the registry's control."""
    if isinstance(model, SAC) and model.ent_coef_optimizer is not None:
        return {"ent_coef_optimizer": model.ent_coef_optimizer}
    return {}


def _rms_state(rms: RunningMeanStd) -> dict[str, Any]:
    return {"mean": torch.as_tensor(rms.mean), "var": torch.as_tensor(rms.var), "count": float(rms.count)}


def _load_rms(rms: RunningMeanStd, state: dict[str, Any]) -> None:
    rms.mean = state["mean"].numpy().astype(np.float64)
    rms.var = state["var"].numpy().astype(np.float64)
    rms.count = float(state["count"])


@dataclass
class RLTrial:
    """One RL trial's live objects: the SB3 model, its envs and the optimizers under test."""

    cfg: RLConfig
    seed: int
    model: BaseAlgorithm
    train_env: VecEnv
    eval_env: VecEnv
    request: TrialOptimizer
    under_test: dict[str, torch.optim.Optimizer]  # the registry optimizers SB3 built, by attribute path
    schedule: LRSchedule
    resolved_hparams: dict[str, Any]

    @classmethod
    def create(cls, cfg: RLConfig, optimizer: str, hparams: dict[str, Any], seed: int, device: str) -> RLTrial:
        # schedule length = the trial's optimizer steps
        request = trial_optimizer(optimizer, hparams, cfg, total_steps=cfg.optimizer_steps())
        train_env, eval_env = make_envs(cfg, seed)
        try:
            model = build_model(cfg, train_env, request.optimizer_class(), request.lr, seed, device)
            schedule = LRSchedule(cfg.lr_schedule, cfg.total_env_steps(), cfg.steps_per_update())
            model.benchmark_lr = schedule  # type: ignore[attr-defined]
            built = registry_optimizers(model)
            resolved = {path: request.verify(opt, where=f"SB3's {path}") for path, opt in built.items()}
            schedule.capture([*built.values(), *sb3_internal_optimizers(model).values()])
        except BaseException:
            train_env.close()
            eval_env.close()
            raise
        return cls(cfg, seed, model, train_env, eval_env, request, built, schedule, next(iter(resolved.values())))

    def params(self) -> dict[str, Any]:
        """Parameters to log at step 0: the optimizer's resolved hyperparameters and the trial's budget."""
        opt = next(iter(self.under_test.values()))
        params: dict[str, Any] = {f"optimizer.{k}": v for k, v in self.resolved_hparams.items()}
        params.update({
            "optimizer.class": f"{type(opt).__module__}.{type(opt).__qualname__}",
            "optimizer.lr_source": self.request.lr_source,
            "env_steps_total": self.cfg.total_env_steps(),
            "optimizer_steps_total": self.cfg.optimizer_steps(),
        })
        return params

    def tags(self) -> dict[str, str]:
        cfg = self.cfg
        tags = {
            "algo": cfg.algo,
            "env_id": cfg.env_id,
            "epoch_env_steps": str(cfg.steps_per_epoch),
            "optimizer_hook": "SB3 policy_kwargs['optimizer_class'] = optimizers.optimizer_class(...)",
            "registry_optimizers": ", ".join(self.under_test),
            "lr_schedule": (
                f"benchmark {cfg.lr_schedule} (SB3's lr schedule switched off; before every SB3 train() each param "
                "group's lr = initial lr x factor(env steps collected before the update's data))"
            ),
            "eval_protocol": (
                f"{cfg.eval_episodes} episodes per epoch, deterministic actions, separate env seeded "
                f"seed+{EVAL_SEED_OFFSET}"
            ),
            "obs_normalization": (
                "VecNormalize obs+reward (eval: frozen train obs stats, raw rewards)" if cfg.setting("normalize")
                else "none"
            ),
            "device": str(self.model.device),
        }
        if cfg.algo == "ppo":
            tags["grad_clip"] = "none" if cfg.max_grad_norm is None else f"SB3 global-norm clip {cfg.max_grad_norm}"
        for path in sb3_internal_optimizers(self.model):
            tags[path] = SB3_ENT_COEF_OPTIMIZER
        return {**tags, **self.request.tags()}

    def train_epoch(self) -> dict[str, float]:
        """`steps_per_epoch` env steps of training; returns SB3's training statistics of the epoch's last update."""
        model, sb3_log = self.model, self.model.logger
        sb3_log.name_to_value.clear()
        sb3_log.name_to_count.clear()
        steps0, updates0, t0 = model.num_timesteps, model._n_updates, time.perf_counter()
        try:
            model.learn(total_timesteps=self.cfg.steps_per_epoch, reset_num_timesteps=False, log_interval=None)
        except ValueError as err:  # torch.distributions rejects NaN policy outputs
            if "nan" in str(err).lower():
                raise Diverged(f"non-finite policy output: {err}") from err
            raise
        self.check_optimizers(trained=model._n_updates > updates0)
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = {
            "env_steps": float(model.num_timesteps),
            "lr": float(next(iter(self.under_test.values())).param_groups[0]["lr"]),
            "fps": (model.num_timesteps - steps0) / max(seconds, 1e-9),
        }
        skip = {"n_updates", "learning_rate", "clip_range"}
        stats = {k.removeprefix("train/"): float(v) for k, v in sb3_log.name_to_value.items() if k.startswith("train/")}
        metrics.update({k: v for k, v in stats.items() if k not in skip})
        if "loss" in metrics:  # PPO: total loss of the last minibatch
            metrics["train_loss"] = metrics.pop("loss")
        elif "actor_loss" in metrics and "critic_loss" in metrics:  # SAC: the two registry-optimized objectives
            metrics["train_loss"] = metrics["actor_loss"] + metrics["critic_loss"]
        if model.ep_info_buffer:  # SB3's rollout/ep_rew_mean: the last 100 finished training episodes
            metrics["train_return"] = float(np.mean([ep["r"] for ep in model.ep_info_buffer]))
        return metrics

    def check_optimizers(self, trained: bool) -> None:
        """Raise unless the model still trains with the registry optimizers, at the benchmark schedule's lr."""
        current = registry_optimizers(self.model)
        for path, opt in self.under_test.items():
            if current[path] is not opt:
                raise RuntimeError(f"SB3 replaced {path}: the registry optimizer is no longer the one training")
        if not trained:
            return
        factor = self.schedule.factor_at(self.model.num_timesteps)
        for path, opt in self.under_test.items():
            for group, lr0 in zip(opt.param_groups, self.schedule.initial_lrs[id(opt)], strict=True):
                if not math.isclose(float(group["lr"]), lr0 * factor, rel_tol=1e-9, abs_tol=1e-15):
                    want = lr0 * factor
                    raise RuntimeError(f"{path} trained at lr {group['lr']}, the benchmark schedule says {want}")

    def evaluate(self) -> dict[str, float]:
        """Mean return of `eval_episodes` deterministic episodes on the evaluation env."""
        sync_envs_normalization(self.train_env, self.eval_env)
        returns, lengths = evaluate_policy(
            self.model, self.eval_env, n_eval_episodes=self.cfg.eval_episodes, deterministic=True,
            return_episode_rewards=True,
        )
        return {
            "test_return": float(np.mean(returns)),
            "test_return_std": float(np.std(returns)),
            "test_ep_len": float(np.mean(lengths)),
        }

    def state_dict(self) -> dict[str, Any]:
        model = self.model
        state: dict[str, Any] = {
            "policy": model.policy.state_dict(),
            "optimizers": {path: opt.state_dict() for path, opt in self.under_test.items()},
            "sb3_optimizers": {path: opt.state_dict() for path, opt in sb3_internal_optimizers(model).items()},
            "num_timesteps": int(model.num_timesteps),
            "n_updates": int(model._n_updates),
            "episode_num": int(model._episode_num),
            "rng": rng_state(),
        }
        if isinstance(model, SAC) and model.log_ent_coef is not None:
            state["log_ent_coef"] = model.log_ent_coef.detach().cpu().clone()
        if isinstance(self.train_env, VecNormalize):
            env = self.train_env
            state["vec_normalize"] = {"obs": _rms_state(env.obs_rms), "ret": _rms_state(env.ret_rms)}
        return state

    def load_state_dict(self, state: dict[str, Any], epoch: int) -> None:
        """Resume from `state_dict()` saved at the end of `epoch` (see the module docstring for what is resumed)."""
        model = self.model
        model.policy.load_state_dict(state["policy"])
        for path, opt in self.under_test.items():
            opt.load_state_dict(state["optimizers"][path])
        for path, opt in sb3_internal_optimizers(model).items():
            opt.load_state_dict(state["sb3_optimizers"][path])
        if "log_ent_coef" in state:
            with torch.no_grad():
                model.log_ent_coef.copy_(state["log_ent_coef"])  # type: ignore[attr-defined]
        model.num_timesteps = int(state["num_timesteps"])
        model._n_updates = int(state["n_updates"])
        model._episode_num = int(state["episode_num"])
        if "vec_normalize" in state:
            assert isinstance(self.train_env, VecNormalize)
            _load_rms(self.train_env.obs_rms, state["vec_normalize"]["obs"])
            _load_rms(self.train_env.ret_rms, state["vec_normalize"]["ret"])
        set_rng_state(state["rng"])
        self.train_env.seed(self.seed + epoch * RESUME_SEED_STRIDE)
        self.eval_env.seed(self.seed + EVAL_SEED_OFFSET + epoch * RESUME_SEED_STRIDE)

    def close(self) -> None:
        self.train_env.close()
        self.eval_env.close()


def final_metrics(curve: list[float], env_steps: int) -> dict[str, float]:
    tail = curve[-max(1, len(curve) // 10):]
    return {
        "test_return": curve[-1],
        "test_return_best": max(curve),
        "test_return_last10pct": float(np.mean(tail)),
        "env_steps": float(env_steps),
    }


def train(cfg: RLConfig, optimizer: str, hparams: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Train for `cfg.epochs` epochs (resuming from the context's checkpoint), evaluating after each one."""
    device = trial_device(cfg.device, ctx)
    trial = RLTrial.create(cfg, optimizer, hparams, seed=ctx.seed, device=device)
    try:
        ctx.log_params(trial.params())
        ctx.set_tags(**trial.tags())
        start, curve = 0, []
        state = ctx.load_checkpoint()
        if state is not None:
            start, curve = int(state["epoch"]), [float(x) for x in state["curve"]]
            trial.load_state_dict(state["trial"], epoch=start)
            ctx.set_tags(
                resumed_from_epoch=str(start),
                resume_scope="policy, optimizer states, counters, VecNormalize stats, RNG; "
                "not episodes in progress nor SAC's replay buffer",
            )
            log.info("resumed %s %s at epoch %d (%d env steps)", cfg.algo, cfg.env_id, start, trial.model.num_timesteps)
        for epoch in range(start + 1, cfg.epochs + 1):
            metrics = trial.train_epoch()
            metrics.update(trial.evaluate())
            curve.append(metrics["test_return"])
            log.info(
                "%s %s %s epoch %d/%d: env steps %d, test return %.1f",
                cfg.algo, cfg.env_id, optimizer, epoch, cfg.epochs, metrics["env_steps"], metrics["test_return"],
            )
            ctx.report(step=epoch, **metrics)
            ctx.save_checkpoint({"epoch": epoch, "curve": curve, "trial": trial.state_dict()})
        return final_metrics(curve, trial.model.num_timesteps)
    finally:
        trial.close()
