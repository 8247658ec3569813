"""RL task family: PPO and SAC on gymnasium's MuJoCo environments with optimizers from the registry.

`tasks.rl.task` holds the config, presets and `RLTask` (importable without stable-baselines3, summarised over seeds
by the interquartile mean with a bootstrap interval, `tasks.summary`), `tasks.rl.trainer` the stable-baselines3
code.
"""

from tasks.rl.task import RLConfig, RLTask

__all__ = ["RLConfig", "RLTask"]
