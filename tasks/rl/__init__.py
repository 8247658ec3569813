"""RL task family: PPO and SAC on gymnasium's MuJoCo environments with optimizers from the registry.

`tasks.rl.task` holds the config, presets and `RLTask` (importable without stable-baselines3), `tasks.rl.trainer`
the stable-baselines3 code, and `tasks.rl.stats` the interquartile mean and bootstrap confidence intervals that the
leaderboard uses to aggregate returns over seeds.
"""

from tasks.rl.task import RLConfig, RLTask

__all__ = ["RLConfig", "RLTask"]
