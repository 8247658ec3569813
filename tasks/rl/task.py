"""RL task: PPO (and SAC) on gymnasium's MuJoCo environments, trained with an optimizer from the registry.

Protocol (SPAM's RL experiment: PPO on Hopper, Ant and HalfCheetah, 100 epochs, test reward, several seeds):

- An *epoch* is `steps_per_epoch` environment steps. For PPO it must be a whole number of rollouts
  (`n_steps * n_envs` steps each), so epoch boundaries fall between updates. The `paper` preset uses the rl-zoo
  MuJoCo defaults for PPO (SB3's PPO defaults plus `VecNormalize`, 1M steps): one epoch = 5 rollouts of 2048 steps
  = 10,240 env steps, and 100 epochs = 1,024,000 env steps (rl-zoo's 1e6 rounded up to whole rollouts).
- After every epoch the policy is evaluated on a separate environment instance (its own seed) with deterministic
  actions for `eval_episodes` episodes; the mean undiscounted return is reported as `test_return` at
  `step = epoch` (1-based), so each trial logs a test-return curve with one point per epoch.
- The headline metric is `test_return` of the last epoch; across seeds the leaderboard aggregates it with the
  interquartile mean and a stratified-bootstrap confidence interval (`tasks.summary`).

The optimizer is the registry's: SB3 builds it through `policy_kwargs=dict(optimizer_class=...)`, and the
learning-rate schedule is the benchmark's (`lr_schedule`), not SB3's — see `tasks.rl.trainer` for how, and the
trial's tags for what a run actually used. SB3's PPO default (and rl-zoo's MuJoCo default) is a constant 3e-4, which
`lr_schedule: constant` with `lr: 3e-4` reproduces; rl-zoo's `lin_...` schedules correspond to `linear`. One SB3
default is deliberately not reproduced: SB3 gives its own `torch.optim.Adam` `eps=1e-5`; the registry's optimizers
keep their own defaults unless the trial's hyperparameters set `eps`. SB3 and MuJoCo are imported only when a
trial runs, so the harness can list configs and resources without them.

Cost: RL trials are bound by the simulator and small MLPs, so they run on CPU (`device: cpu`, one core, no GPU) by
default; `device: cuda` asks for `gpu_fraction` of a GPU so that many trials share one. `estimate_flops` is 0;
`estimate_seconds` gives the wall-clock estimate that GPU- and CPU-hour estimates should use instead.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.base import Resources, Task, TaskConfig, TrialContext, torch_threads

EnvId = Literal["Hopper-v5", "Ant-v5", "HalfCheetah-v5", "Walker2d-v5", "Humanoid-v5", "Swimmer-v5"]

# SB3 / rl-zoo defaults of the settings whose default depends on the algorithm (a config value of None means these).
ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"net_arch": [64, 64], "activation": "tanh", "normalize": True, "batch_size": 64},
    "sac": {"net_arch": [256, 256], "activation": "relu", "normalize": False, "batch_size": 256},
}

# Measured env steps per second of training on one CPU core (torch_threads=1), default network sizes, evaluation
# included; used only for time estimates. Larger observation spaces (Ant, Humanoid) run somewhat slower.
STEPS_PER_SECOND: dict[str, float] = {"ppo": 700.0, "sac": 60.0}


class RLConfig(TaskConfig):
    """One RL trial. Fields left at None take the SB3/rl-zoo default of the chosen algorithm (`ALGO_DEFAULTS`)."""

    env_id: EnvId = "Hopper-v5"
    algo: Literal["ppo", "sac"] = "ppo"
    epochs: int = Field(100, ge=1)
    steps_per_epoch: int = Field(10_240, ge=1, description="env steps per epoch (all envs together)")
    eval_episodes: int = Field(10, ge=1, description="deterministic test episodes after each epoch")
    n_envs: int = Field(1, ge=1, description="training environments stepped in lockstep (one process)")
    net_arch: list[int] | None = Field(None, description="hidden sizes of the policy and value/Q networks")
    activation: Literal["tanh", "relu"] | None = None
    normalize: bool | None = Field(None, description="VecNormalize observations and rewards (rl-zoo: PPO yes)")
    gamma: float = Field(0.99, gt=0, le=1)
    batch_size: int | None = Field(None, ge=1, description="PPO minibatch / SAC batch size")

    # Learning rate: the trial's `lr` hyperparameter when it sets one, otherwise this (SB3's default).
    lr: float = Field(3e-4, gt=0)
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="benchmark-driven: linear decays to 0 over the trial (SB3's own schedule is off)"
    )

    # PPO (SB3 defaults).
    n_steps: int = Field(2048, ge=1, description="rollout length per env")
    n_epochs: int = Field(10, ge=1, description="PPO passes over each rollout (not benchmark epochs)")
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    ent_coef: float = Field(0.0, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float | None = Field(0.5, gt=0, description="SB3's global-norm clipping; None turns it off")

    # SAC (SB3 defaults, rl-zoo MuJoCo learning_starts).
    buffer_size: int = Field(1_000_000, ge=1)
    learning_starts: int = Field(10_000, ge=0)
    tau: float = Field(0.005, gt=0, le=1)
    train_freq: int = Field(1, ge=1, description="env steps (per env) between SAC updates")
    gradient_steps: int = Field(1, ge=1)

    device: Literal["cpu", "cuda"] = Field("cpu", description="MLP policies are faster on CPU")
    gpu_fraction: float = Field(0.1, gt=0, le=1, description="share of a GPU one trial asks for with device=cuda")
    torch_threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _whole_updates_per_epoch(self) -> RLConfig:
        unit = self.steps_per_update()
        if self.steps_per_epoch % unit:
            raise ValueError(
                f"steps_per_epoch={self.steps_per_epoch} must be a multiple of the env steps per {self.algo} update "
                f"({unit}: {'n_steps * n_envs' if self.algo == 'ppo' else 'train_freq * n_envs'})"
            )
        return self

    def setting(self, name: str) -> Any:
        """A field's value, or the algorithm's default when the field is None."""
        value = getattr(self, name)
        return ALGO_DEFAULTS[self.algo][name] if value is None else value

    def steps_per_update(self) -> int:
        """Env steps collected between two training phases (a PPO rollout; SAC's train_freq)."""
        return (self.n_steps if self.algo == "ppo" else self.train_freq) * self.n_envs

    def total_env_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def optimizer_steps(self) -> int:
        """`step()` calls of each registry optimizer over the whole trial (e.g. Stable-SPAM's `total_steps`)."""
        updates = self.total_env_steps() // self.steps_per_update()
        if self.algo == "ppo":
            minibatches = math.ceil(self.n_steps * self.n_envs / self.setting("batch_size"))
            return updates * self.n_epochs * minibatches
        # SB3 trains after a collection once num_timesteps > learning_starts.
        trained_updates = max(0, updates - self.learning_starts // self.steps_per_update())
        return trained_updates * self.gradient_steps


_PPO_PAPER: dict[str, Any] = {
    # rl-zoo `mujoco-defaults` for PPO: SB3's PPO defaults, VecNormalize, n_envs=1, 1e6 steps, constant lr 3e-4.
    "algo": "ppo",
    "epochs": 100,
    "steps_per_epoch": 10_240,
    "eval_episodes": 10,
}


class RLTask(Task):
    """PPO/SAC on MuJoCo; metric: mean deterministic test return after the last epoch (higher is better)."""

    name: ClassVar[str] = "rl"
    Config: ClassVar[type[TaskConfig]] = RLConfig
    metric: ClassVar[str] = "test_return"
    mode: ClassVar[Literal["min", "max"]] = "max"
    summary = "iqm"  # interquartile mean over seeds with a bootstrap interval
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # 5 epochs x 1024 env steps of Hopper (2 rollouts of 512 per epoch), 2 test episodes per epoch.
        "smoke": {
            "env_id": "Hopper-v5",
            "algo": "ppo",
            "epochs": 5,
            "steps_per_epoch": 1024,
            "n_steps": 512,
            "n_epochs": 4,
            "eval_episodes": 2,
        },
        # SAC through the same code path: 3 epochs x 200 env steps, updates from step 100.
        "smoke-sac": {
            "env_id": "Hopper-v5",
            "algo": "sac",
            "epochs": 3,
            "steps_per_epoch": 200,
            "learning_starts": 100,
            "buffer_size": 1000,
            "batch_size": 64,
            "net_arch": [64, 64],
            "eval_episodes": 2,
        },
        # The paper protocol cut to its first 20 epochs (same epoch size, 204,800 env steps), 5 test episodes.
        "mini": {**_PPO_PAPER, "epochs": 20, "eval_episodes": 5},
        "paper": _PPO_PAPER,
        # SAC with the rl-zoo MuJoCo defaults: 100 epochs x 10,000 env steps, random actions for the first 10,000.
        "paper-sac": {"algo": "sac", "epochs": 100, "steps_per_epoch": 10_000, "eval_episodes": 10},
    }

    def resources(self, cfg: TaskConfig) -> Resources:
        assert isinstance(cfg, RLConfig)
        gpus = cfg.gpu_fraction if cfg.device == "cuda" else 0.0
        return Resources(cpus=float(cfg.torch_threads), gpus=gpus)

    def estimate_flops(self, cfg: TaskConfig) -> float:
        """0: RL trials are bound by the simulator, not by FLOPs; use `estimate_seconds` for time estimates."""
        return 0.0

    @classmethod
    def estimate_seconds(cls, cfg: TaskConfig) -> float:
        """Wall-clock seconds of one trial on one CPU core (GPU-hours = resources().gpus x this / 3600)."""
        assert isinstance(cfg, RLConfig)
        return cfg.total_env_steps() / STEPS_PER_SECOND[cfg.algo]

    def run(self, cfg: TaskConfig, optimizer: str, hparams: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
        assert isinstance(cfg, RLConfig)
        from tasks.rl.trainer import train

        with torch_threads(cfg.torch_threads):
            return train(cfg, optimizer, hparams, ctx)
