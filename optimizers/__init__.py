"""Spike-aware optimizers (SPAM, Stable-SPAM), their components, the papers' baselines, one registry, a spike monitor.

Public API:

- `SPAM`, `StableSPAM`: drop-in `torch.optim.Optimizer`s (need only torch).
- `build(name, params_or_model, **hparams)`, `available()`, `catalog()`, `spec(name)`, `resolved_hparams(opt)`,
  `verify(opt, name, requested)`, `optimizer_class(name, **hparams)`, `param_groups(model)`: the registry (module
  `registry`).
- `plugins`: user optimizers (``module:attr`` names, the ``bench.optimizers`` entry points), which the registry
  builds like its own names.
- `specs`: one spec per component and in-house base (hyperparameters, defaults, checks, state), which the registry,
  the optimizers and `bench list optimizers` read.
- `SpikeMonitor`: per-layer-type gradient spike statistics (module `spike_monitor`).
- `SpikeAwareAdam`, `ComponentWrapper`: the engines behind the compositions (modules `spike_aware`, `compose`);
  `functional` holds the tensor math of every transform.

Baseline packages (transformers, adam-mini, lion-pytorch, galore-torch) are imported only when an optimizer that
needs them is built.
"""

from __future__ import annotations

from . import plugins, specs
from .compose import ComponentWrapper
from .registry import (
    OptimizerConfigError,
    OptimizerSpec,
    OptimizerUnavailableError,
    available,
    build,
    catalog,
    optimizer_class,
    param_groups,
    resolved_hparams,
    spec,
    verify,
)
from .spam import SPAM
from .spike_aware import SpikeAwareAdam
from .spike_monitor import SpikeMonitor
from .stable_spam import StableSPAM

__all__ = [
    "SPAM",
    "ComponentWrapper",
    "OptimizerConfigError",
    "OptimizerSpec",
    "OptimizerUnavailableError",
    "SpikeAwareAdam",
    "SpikeMonitor",
    "StableSPAM",
    "available",
    "build",
    "catalog",
    "optimizer_class",
    "param_groups",
    "plugins",
    "specs",
    "resolved_hparams",
    "spec",
    "verify",
]
