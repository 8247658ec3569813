"""Optimizers from outside this package: ``module:attr`` names and the ``bench.optimizers`` entry-point group.

A user optimizer is a `torch.optim.Optimizer` subclass, or a factory ``(params, **hparams) -> Optimizer``. It is
named by its import path (``mypkg.opt:MyOptimizer``) or by a name that an installed package registers::

    [project.entry-points."bench.optimizers"]
    myopt = "mypkg.opt:MyOptimizer"

Built-in names win over entry points of the same name. Its hyperparameters are the keyword parameters of its
signature (the class's ``__init__`` or the factory) after the first (the parameters), with their defaults; a
``**kwargs`` parameter makes it accept any name (and take the task's ``lr``; compositions over it take its named
hyperparameters and ``lr``). Optional attributes of the class or factory:

- ``bench_defaults``: its own default hyperparameters (names it accepts). Trials of a suite take them where the
  experiment and the row leave a name unset, so they win over the task's values (the preset's lr, ...).
- ``bench_lr_grid``: the learning rates ``bench sweep`` tries when not given ``--lr``.
- ``bench_state``: ``{"moments": [state keys], "step": state key or None}``, where its state keeps what the
  ``moret`` component resets.

Components compose over it as over the package bases (``mypkg.opt:MyOptimizer+adagn+adaclip``); ``moret`` needs
``bench_state``. Every problem (import failure, not an optimizer, bad declarations) is an `OptimizerConfigError`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .baselines import BASELINES, Baseline, ParamInput, package_version
from .compose import COMPONENTS, BaseStateLayout
from .registry import (
    ALIASES,
    COMPONENT_HPARAMS,
    IN_HOUSE,
    OptimizerConfigError,
    OptimizerSpec,
    _composite_spec,
    _normalize,
)

__all__ = ["GROUP", "installed", "lr_grid", "own_defaults", "user_spec"]

GROUP = "bench.optimizers"


@dataclasses.dataclass(frozen=True)
class UserBaseline(Baseline):
    """A `Baseline` for a user optimizer: provenance is where it was loaded from."""

    origin: str = ""
    accepts_any: bool = False
    own_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr_grid: tuple[float, ...] = ()

    @property
    def source(self) -> str:
        return self.origin


@functools.cache
def installed() -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points of group ``bench.optimizers``, by normalized name (built-in names left out)."""
    builtin = {*BASELINES, *IN_HOUSE, *ALIASES}
    eps = {_normalize(ep.name): ep for ep in importlib.metadata.entry_points(group=GROUP)}
    return {k: v for k, v in sorted(eps.items()) if k not in builtin}


def _split(name: str) -> tuple[str, list[str]] | None:
    """(base, components) when `name` names a user optimizer, else None (a built-in or unknown name)."""
    if not isinstance(name, str):
        return None
    base, *parts = [p.strip() for p in name.strip().split("+")]
    if ":" not in base and _normalize(base) not in installed():
        return None
    return base, [_normalize(p) for p in parts]


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise OptimizerConfigError(f"optimizer {target!r}: write an import path as module:attribute, e.g. "
                                   "mypkg.opt:MyOptimizer")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure inside the user's module is reported, not raised through
        raise OptimizerConfigError(f"optimizer {target!r}: importing module {module_name!r} failed: "
                                   f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptimizerConfigError(f"optimizer {target!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _load(base: str) -> tuple[Any, str, str]:
    """The object a user name points to, its display target and its provenance."""
    if ":" in base:
        obj = _import(base)
        where = getattr(inspect.getmodule(obj), "__file__", None) or "?"
        return obj, base, f"user optimizer {base} ({where})"
    ep = installed()[_normalize(base)]
    try:
        obj = ep.load()
    except Exception as exc:  # a broken installed package is reported, not raised through
        raise OptimizerConfigError(f"optimizer {base!r} (entry point {ep.value!r} of group {GROUP!r}) failed to "
                                   f"load: {type(exc).__name__}: {exc}") from None
    dist = ep.dist.name if ep.dist is not None else None
    where = f"{dist} {package_version(dist) or '(version unknown)'}" if dist else f"entry point {ep.name}"
    return obj, ep.value, f"{where} ({ep.value})"


def _hparams_of(obj: Any, target: str) -> tuple[dict[str, Any], set[str], bool]:
    """(signature defaults, accepted names, accepts any name) of a class's __init__ or a factory."""
    is_class = isinstance(obj, type)
    if is_class and not issubclass(obj, torch.optim.Optimizer):
        raise OptimizerConfigError(f"optimizer {target!r} is the class {obj.__qualname__}, which is not a "
                                   "torch.optim.Optimizer subclass")
    if not is_class and not callable(obj):
        raise OptimizerConfigError(f"optimizer {target!r} is a {type(obj).__name__}, not a torch.optim.Optimizer "
                                   "subclass or a factory (params, **hparams)")
    try:
        params = list(inspect.signature(obj.__init__ if is_class else obj).parameters.values())
    except (TypeError, ValueError) as exc:
        raise OptimizerConfigError(f"optimizer {target!r}: its signature cannot be read ({exc})") from None
    params = params[1:] if is_class else params  # self
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise OptimizerConfigError(f"optimizer {target!r} must take the parameters as its first argument")
    named = [p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    defaults = {p.name: p.default for p in named if p.default is not p.empty}
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    # Behind **kwargs lies at least torch's `lr`, which the tasks fill in and their schedulers scale.
    return defaults, {p.name for p in named} | ({"lr"} if accepts_any else set()), accepts_any


def _declared(obj: Any, target: str, accepts: set[str], accepts_any: bool) -> tuple[dict[str, Any],
                                                                                 tuple[float, ...], BaseStateLayout]:
    own = getattr(obj, "bench_defaults", {})
    if not isinstance(own, dict) or (not accepts_any and set(own) - accepts):
        raise OptimizerConfigError(f"optimizer {target!r}: bench_defaults must be a dict of hyperparameters it "
                                   f"accepts ({', '.join(sorted(accepts))}), got {own!r}")
    grid = getattr(obj, "bench_lr_grid", ())
    try:
        lrs = tuple(float(v) for v in grid)
    except (TypeError, ValueError):
        lrs = (0.0,)
    if any(not v > 0 for v in lrs):
        raise OptimizerConfigError(f"optimizer {target!r}: bench_lr_grid must list positive numbers, got {grid!r}")
    own = {k: tuple(v) if isinstance(v, list) else v for k, v in own.items()}  # a value, not a grid axis
    state = getattr(obj, "bench_state", None)
    if state is None:
        return own, lrs, BaseStateLayout(())
    if not isinstance(state, dict) or set(state) - {"moments", "step"} or isinstance(state.get("moments"), str):
        raise OptimizerConfigError(f"optimizer {target!r}: bench_state must be {{'moments': [state keys], "
                                   f"'step': state key or None}}, got {state!r}")
    return own, lrs, BaseStateLayout(tuple(state.get("moments", ())), state.get("step"))


def _factory(obj: Any, target: str) -> Callable[[ParamInput, dict[str, Any]], torch.optim.Optimizer]:
    def build(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
        opt = obj(inp.groups, **hp)
        if not isinstance(opt, torch.optim.Optimizer):
            raise OptimizerConfigError(f"optimizer {target!r} returned a {type(opt).__name__}, not a "
                                       "torch.optim.Optimizer")
        return opt

    return build


@functools.cache
def _baseline(base: str) -> UserBaseline:
    obj, target, origin = _load(base)
    defaults, accepts, accepts_any = _hparams_of(obj, target)
    own, lrs, layout = _declared(obj, target, accepts, accepts_any)
    name = base if ":" in base else _normalize(base)
    return UserBaseline(name=name, target=target, distribution=None, defaults={**defaults, **own}, layout=layout,
                        factory=_factory(obj, target), description=(inspect.getdoc(obj) or target).split("\n")[0],
                        extra_accepts=frozenset(accepts), origin=origin, accepts_any=accepts_any, own_defaults=own,
                        lr_grid=lrs)


def user_spec(name: str) -> OptimizerSpec | None:
    """The spec of a user optimizer name (with components, if any), or None for every other name."""
    split = _split(name)
    if split is None:
        return None
    base, components = split
    b = _baseline(base)
    if not components:
        return OptimizerSpec(name=b.name, defaults=dict(b.defaults), accepts=b.accepts, source=b.source,
                             needs_model=False, description=b.description, base=b.name, factory=b.factory,
                             accepts_any=b.accepts_any)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or "" in components or len(set(components)) != len(components):
        raise OptimizerConfigError(f"bad components {components} in {name!r}: each at most once, among "
                                   f"{', '.join(COMPONENTS)}")
    if "moret" in components and not b.layout.moment_keys:
        raise OptimizerConfigError(
            f"{name!r}: moret resets the optimizer's moments, and {b.target} does not say where its state keeps "
            "them; declare bench_state = {'moments': [...], 'step': ...} on it, or leave moret out")
    clash = sorted(set(b.accepts) & {k for c in components for k in COMPONENT_HPARAMS[c]})
    if clash:
        raise OptimizerConfigError(f"{name!r}: {b.target} has hyperparameter(s) {clash} that the components also "
                                   "use; this composition is not defined")
    composite = _composite_spec(f"{b.name}+{'+'.join(components)}", b.name, tuple(components), baseline=b)
    return dataclasses.replace(composite, accepts=composite.accepts | b.accepts)  # with those without a default


def own_defaults(name: str) -> dict[str, Any]:
    """The hyperparameters a user optimizer declares as its own (`bench_defaults`); {} for other names."""
    split = _split(name)
    return dict(_baseline(split[0]).own_defaults) if split else {}


def lr_grid(name: str) -> list[float]:
    """The learning rates a user optimizer declares for sweeps (`bench_lr_grid`); [] for other names."""
    split = _split(name)
    return list(_baseline(split[0]).lr_grid) if split else []
