"""Spike-aware components and the machinery that composes them over a base optimizer.

Components (DESIGN.md, "Algorithms"; the math is in `functional.py`):

- ``gradclip``: global-norm clipping over every parameter of the optimizer (``max_norm``, 1.0 in the papers), the
  arithmetic of ``torch.nn.utils.clip_grad_norm_``.
- ``adaclip``: Stable-SPAM's adaptive spike clipping (``gamma3``).
- ``adagn``: Stable-SPAM's adaptive gradient-norm scaling (``gamma1``, ``gamma2``; eps is the base's ``eps`` for the
  in-house Adam and ``adagn_eps`` for package bases).
- ``spikeclip``: SPAM's spike-aware clipping (``threshold``) against the second moment v, on steps whose distance
  from the last momentum reset (or from the start, without ``moret``) is at least 20.
- ``moret``: momentum reset every ``reset_interval`` steps, with an optional SPAM post-reset warmup.

Every component works on a private copy of the gradient; ``p.grad`` is left as the caller gave it. Components run
in one canonical order whatever the order of the name: gradclip, adaclip, adagn, spikeclip, then the base update
(with moret acting on the base's state). Clipping comes first; spikeclip comes last because it compares the gradient
with the second moment that this same gradient then enters.

Counters. k = 1, 2, ... counts ``step()`` calls (kept in every param group as ``global_step``, so it is saved with
the state dict); each tensor has its own update counters. AdaClip and AdaGN bias-correct their averages with a
per-tensor counter c (state key ``stat_step``); the base's bias correction uses its own counter. How ``moret``
treats them is ``moret_mode``:

- ``"stable_spam"`` (default; Stable-SPAM's reference implementation): on a step with k mod reset_interval = 0 the
  shared counter is set to c = 1 after AdaClip and AdaGN used c + 1; the base updates with its old moments and
  counter 1; fresh zero moments are installed afterwards, for the next step. AdaClip's T and AdaGN's mu, nu are not
  reset, but their bias corrections restart with c, so their thresholds are inflated right after a reset.
- ``"clean"``: the base's moments are zeroed before the update on the reset step and its counter restarts at 1;
  AdaClip and AdaGN keep a separate counter that is never reset.
- ``"spam"`` (SPAM): moments are zeroed before the update on the reset step; no counter is reset.

``warmup_steps`` N > 0 adds SPAM's post-reset warmup, s(j) for j = k mod reset_interval < N after the first reset.
Parameters without a gradient on a reset step are not reset (as in both reference implementations). With
``total_steps``, Stable-SPAM's cosine factor a_k scales AdaGN's gamma1 and the in-house Adam's beta1; the registry
passes it only to the names that own that schedule (`registry.owns_schedule`), never to package bases.

Scope. AdaClip and AdaGN leave the gradients of a param group with ``group[ADAPTIVE_OFF] = True`` unchanged (the
registry sets it on the Adam-mini blocks that the authors' variant updates without them).

Bases. ``SpikeAwareAdam`` (module `spike_aware`) is the in-house Adam on which ``spam``, ``stable_spam`` and the
``adam``/``adamw`` compositions run. Package bases (Lion, Adam-mini, Adafactor, SGD, GaLore) are wrapped by
``ComponentWrapper``: it computes the transformed gradient in a copy, hands it to the base as ``p.grad`` for the
base's ``step()``, and restores the caller's gradient afterwards. ``moret`` on a package base zeroes the moment
tensors listed in its `BaseStateLayout` (after the base's step in mode "stable_spam", before it in the others) and
restarts its step counter in modes "stable_spam" and "clean" (set to 0 before the base's step, so that the base
counts this step as 1); the post-reset warmup scales the base's learning
rate (so weight decay that the base multiplies by lr is scaled too). A spikeclip on a package base keeps its own
second moment (``spike_beta2``), which moret resets with the base.

Precision: ``state_dtype="param"`` keeps component state and gradient copies in the parameter's dtype (the papers'
bf16 runs); ``"float32"`` keeps them in float32 for 16-bit parameters (wider dtypes are kept as they are).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from .specs import COMPONENT_SPECS, COMPONENTS, MORET_MODES, STATE_DTYPES, check_value, default, pipeline_hparams

__all__ = [
    "ADAPTIVE_OFF",
    "COMPONENTS",
    "MORET_MODES",
    "SPIKE_CLIP_SKIP",
    "STATE_DTYPES",
    "BaseStateLayout",
    "Bucket",
    "ComponentOptimizer",
    "ComponentWrapper",
    "Pipeline",
    "StepContext",
    "compute_dtype",
]

# Application order of the gradient transforms (`specs.COMPONENTS`; moret acts on the base's state, not the gradient).
GRADIENT_TRANSFORMS: tuple[str, ...] = tuple(c for c in COMPONENTS if c != "moret")
# Param-group key: True keeps AdaClip and AdaGN off that group's gradients.
ADAPTIVE_OFF = "adaptive_off"
# SPAM clips only on steps at least this far from the last momentum reset.
SPIKE_CLIP_SKIP = 20

WARMUP_TOO_LONG = (
    "warmup_steps={warmup} is longer than reset_interval={interval}: the post-reset warmup would never finish, so "
    "the update would never reach its full size (the public SPAM training script passes the LR-schedule warmup, e.g. "
    "1000, as this warmup and then trains at about a fifth of its learning rate). Use warmup_steps <= reset_interval "
    "(SPAM's default is 150 with reset_interval 500)."
)


def compute_dtype(param_dtype: torch.dtype, state_dtype: str) -> torch.dtype:
    """The dtype in which gradients are transformed and optimizer state is kept for a parameter of `param_dtype`."""
    if state_dtype == "float32" and param_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param_dtype


@dataclass(frozen=True)
class StepContext:
    """Everything about step k that depends only on k (host-side values)."""

    k: int
    reset: bool
    since_reset: int
    warmup: float
    schedule: float
    spike_clip_active: bool


@dataclass(frozen=True)
class Pipeline:
    """Optimizer-wide configuration of the components (per-tensor hyperparameters live in the param groups)."""

    components: frozenset[str] = field(default_factory=frozenset)
    moret_mode: str = default("moret_mode")
    reset_interval: int = default("reset_interval")
    warmup_steps: int = default("warmup_steps")
    max_norm: float = default("max_norm")
    total_steps: int | None = default("total_steps")
    eta_min: float = default("eta_min")
    state_dtype: str = default("state_dtype")

    def __post_init__(self) -> None:
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)}; valid components: {', '.join(COMPONENTS)}")
        for name, hparam in pipeline_hparams().items():
            check_value(name, hparam, getattr(self, name))
        if self.warmup_steps > 0 and "moret" not in self.components:
            raise ValueError("warmup_steps is SPAM's post-reset warmup and needs the 'moret' component")
        if self.warmup_steps > self.reset_interval:
            raise ValueError(WARMUP_TOO_LONG.format(warmup=self.warmup_steps, interval=self.reset_interval))

    def has(self, component: str) -> bool:
        return component in self.components

    @property
    def transforms(self) -> tuple[str, ...]:
        """The gradient transforms in use, in application order."""
        return tuple(c for c in GRADIENT_TRANSFORMS if c in self.components)

    def context(self, k: int) -> StepContext:
        if self.has("moret"):
            since = k % self.reset_interval
            reset = since == 0
            warmup = F.spam_warmup_factor(since, self.warmup_steps) if k >= self.reset_interval else 1.0
        else:
            since, reset, warmup = k, False, 1.0
        return StepContext(
            k=k,
            reset=reset,
            since_reset=since,
            warmup=warmup,
            schedule=F.stable_spam_schedule(k, self.total_steps, self.eta_min),
            spike_clip_active=since >= SPIKE_CLIP_SKIP,
        )

    def describe(self) -> dict[str, Any]:
        """The optimizer-wide settings in effect, flat, for logging."""
        out: dict[str, Any] = {
            "components": "+".join(c for c in COMPONENTS if c in self.components),
            "state_dtype": self.state_dtype,
        }
        if self.has("moret"):
            out.update(reset_interval=self.reset_interval, moret_mode=self.moret_mode, warmup_steps=self.warmup_steps)
        if self.has("gradclip"):
            out["max_norm"] = self.max_norm
        out.update(total_steps=self.total_steps, eta_min=self.eta_min)
        return out


@dataclass
class Bucket:
    """Parameters of one param group that share a device and a dtype, processed together by foreach ops."""

    group: dict[str, Any]
    dtype: torch.dtype
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    work: list[Tensor] = field(default_factory=list)


def component_group_defaults(components: Iterable[str], values: dict[str, Any], *, package: bool = False
                             ) -> dict[str, Any]:
    """Per-tensor component hyperparameters (`specs`, ``per_group``), checked, stored in each param group: those of
    every component in `components`, with their package-base extras if `package`; `values` overrides defaults."""
    out: dict[str, Any] = {}
    for name in COMPONENTS:
        if name not in components:
            continue
        spec = COMPONENT_SPECS[name]
        for key, hparam in {**spec.hparams, **(spec.package_hparams if package else {})}.items():
            if hparam.per_group:
                value = values.get(key, hparam.default)
                check_value(key, hparam, value)
                out[key] = value
    return out


class ComponentOptimizer(torch.optim.Optimizer):
    """Shared machinery: the step counter, gradient collection, the gradient transforms, exact state dicts."""

    pipeline: Pipeline
    package_base = False  # True: over a package optimizer, with the components' `package_state` too

    def __init__(self, params: Any, defaults: dict[str, Any], pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        super().__init__(params, defaults)

    # --- step counter -------------------------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """k: how many times `step()` has run (saved with the param groups)."""
        groups = getattr(self, "param_groups", None)
        return int(groups[0].get("global_step", 0)) if groups else 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group.setdefault("global_step", self.global_step)
        super().add_param_group(param_group)

    def _begin_step(self) -> StepContext:
        k = self.global_step + 1
        for group in self.param_groups:
            group["global_step"] = k
        return self.pipeline.context(k)

    # --- gradients ----------------------------------------------------------------------------------------------

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype,
                    ctx: StepContext) -> None:
        """Create the component state of a parameter on its first update (each component's `specs` state)."""
        for name in COMPONENTS:
            if not self.pipeline.has(name):
                continue
            spec = COMPONENT_SPECS[name]
            for key, kind in {**spec.state, **(spec.package_state if self.package_base else {})}.items():
                if key in state:
                    continue
                if kind == "counter":
                    state[key] = 0
                elif kind == "scalar":
                    state[key] = torch.zeros((), dtype=dtype, device=p.device)
                else:
                    state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _collect(self, ctx: StepContext, copy: bool) -> list[Bucket]:
        """Parameters with a gradient, bucketed by (group, device, dtype), with working gradients.

        The working gradients are copies in the compute dtype when `copy` is set or a cast is needed, otherwise the
        caller's own tensors (which are then only read).
        """
        buckets = self._buckets(ctx)
        for bucket in buckets:
            if copy or bucket.dtype != bucket.params[0].dtype:
                bucket.work = F.copy_tensors(bucket.grads, bucket.dtype)
            else:
                bucket.work = list(bucket.grads)
        return buckets

    def _buckets(self, ctx: StepContext) -> list[Bucket]:
        """Parameters with a gradient, bucketed by (group, device, dtype), state initialised, no working copies."""
        buckets: dict[tuple[int, torch.device, torch.dtype], Bucket] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                dtype = compute_dtype(p.dtype, self.pipeline.state_dtype)
                key = (index, p.device, p.dtype)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket(group=group, dtype=dtype)
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group, dtype, ctx)
                bucket.params.append(p)
                bucket.grads.append(grad)
                bucket.states.append(state)
        return list(buckets.values())

    def _adagn_eps(self, group: dict[str, Any]) -> float:
        return float(group["eps"])

    def _transform(self, buckets: list[Bucket], ctx: StepContext) -> None:
        """gradclip, adaclip and adagn, in that order, on the working gradients."""
        cfg = self.pipeline
        if cfg.has("gradclip"):
            F.clip_by_global_norm_([b.work for b in buckets], cfg.max_norm)
        if not (cfg.has("adaclip") or cfg.has("adagn")):
            return
        for b in buckets:
            if b.group.get(ADAPTIVE_OFF, False):
                continue
            for state in b.states:
                state["stat_step"] += 1
            counts = [state["stat_step"] for state in b.states]
            if cfg.has("adaclip"):
                gamma3 = b.group["gamma3"]
                F.adaclip_(b.work, [s["clip_threshold"] for s in b.states], gamma3, [1.0 - gamma3**c for c in counts])
            if cfg.has("adagn"):
                gamma1 = b.group["gamma1"] * ctx.schedule
                gamma2 = b.group["gamma2"]
                F.adagn_(
                    b.work,
                    [s["gn_mean"] for s in b.states],
                    [s["gn_sq_mean"] for s in b.states],
                    gamma1,
                    gamma2,
                    [1.0 - gamma1**c for c in counts],
                    [1.0 - gamma2**c for c in counts],
                    self._adagn_eps(b.group),
                )
            if ctx.reset and cfg.has("moret") and cfg.moret_mode == "stable_spam":
                for state in b.states:
                    state["stat_step"] = 1

    # --- state dict ---------------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep every saved state tensor's own dtype (torch casts floats to the param dtype,
        which would round float32 state of bf16 parameters)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        self._restore_state_dtypes(saved)

    def _restore_state_dtypes(self, saved: dict[Any, dict[str, Any]]) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            entry = saved.get(index)
            if not entry:
                continue
            state = self.state[p]
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    state[key] = value.to(device=p.device, copy=True)


@dataclass(frozen=True)
class BaseStateLayout:
    """Where a package optimizer keeps what `moret` resets: its moment tensors and its step counter."""

    moment_keys: tuple[str, ...]
    counter_key: str | None = None


_OWN_PREFIX = "component."


class ComponentWrapper(ComponentOptimizer):
    """Components over a package optimizer (`base`), which keeps its own update rule and state.

    The wrapper shares the base's param groups (one list of dicts), so an LR scheduler or a change of ``lr`` on
    either reaches both. Its state dict holds the base's state and the components' state (keys prefixed with
    ``"component."``) in torch's usual layout.
    """

    package_base = True

    def __init__(self, base: torch.optim.Optimizer, pipeline: Pipeline, layout: BaseStateLayout, **hparams: Any
                 ) -> None:
        """`hparams`: the components' per-tensor hyperparameters (`specs`), defaults where not given."""
        defaults = component_group_defaults(pipeline.components, hparams, package=True)
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise TypeError(f"hyperparameter(s) {unknown} belong to no component of {sorted(pipeline.components)}")
        self.base = base
        self.layout = layout
        self._shared = False
        super().__init__(base.param_groups, defaults, pipeline)
        self.param_groups = base.param_groups
        self._shared = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._shared:
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        param_group.setdefault("global_step", self.global_step)

    def _adagn_eps(self, group: dict[str, Any]) -> float:
        return float(group["adagn_eps"])

    def _reset_moments(self, buckets: list[Bucket]) -> None:
        tensors: list[Tensor] = []
        for b in buckets:
            for p, own in zip(b.params, b.states, strict=True):
                base_state = self.base.state.get(p)
                if base_state:
                    tensors.extend(v for k in self.layout.moment_keys if isinstance(v := base_state.get(k), Tensor))
                if "spike_exp_avg_sq" in own:
                    tensors.append(own["spike_exp_avg_sq"])
        if tensors:
            torch._foreach_zero_(tensors)

    def _restart_counters(self, buckets: list[Bucket]) -> None:
        key = self.layout.counter_key
        if key is None:
            return
        for b in buckets:
            for p in b.params:
                base_state = self.base.state.get(p)
                if base_state and key in base_state:
                    value = base_state[key]
                    base_state[key] = torch.zeros_like(value) if isinstance(value, Tensor) else 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ctx = self._begin_step()
        cfg = self.pipeline
        swap = bool(cfg.transforms)
        buckets = self._collect(ctx, copy=swap)
        self._transform(buckets, ctx)
        if cfg.has("spikeclip"):
            for b in buckets:
                exp_avg_sqs = [s["spike_exp_avg_sq"] for s in b.states]
                if ctx.spike_clip_active:
                    F.spike_clip_(b.work, exp_avg_sqs, b.group["threshold"])
                F.ema_sq_(exp_avg_sqs, b.work, b.group["spike_beta2"])
        reset = ctx.reset and cfg.has("moret")
        if reset and cfg.moret_mode in ("clean", "spam"):
            self._reset_moments(buckets)
        if reset and cfg.moret_mode in ("clean", "stable_spam"):
            self._restart_counters(buckets)
        swapped: list[tuple[Tensor, Tensor | None]] = []
        lrs: list[Any] | None = None
        try:
            if ctx.warmup != 1.0:
                lrs = [group["lr"] for group in self.param_groups]
                for group in self.param_groups:
                    group["lr"] = group["lr"] * ctx.warmup
            if swap:
                for b in buckets:
                    for p, g in zip(b.params, b.work, strict=True):
                        swapped.append((p, p.grad))
                        p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            self.base.step()
        finally:
            for p, g in swapped:
                p.grad = g
            if lrs is not None:
                for group, lr in zip(self.param_groups, lrs, strict=True):
                    group["lr"] = lr
        if reset and cfg.moret_mode == "stable_spam":
            self._reset_moments(buckets)
        return loss

    def state_dict(self) -> dict[str, Any]:
        base_sd = self.base.state_dict()
        own_sd = super().state_dict()
        state: dict[Any, dict[str, Any]] = {k: dict(v) for k, v in base_sd["state"].items()}
        for index, entry in own_sd["state"].items():
            merged = state.setdefault(index, {})
            for key, value in entry.items():
                merged[_OWN_PREFIX + key] = value
        return {"state": state, "param_groups": base_sd["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base_state: dict[Any, dict[str, Any]] = {}
        own_state: dict[Any, dict[str, Any]] = {}
        for index, entry in state_dict["state"].items():
            for key, value in entry.items():
                if isinstance(key, str) and key.startswith(_OWN_PREFIX):
                    own_state.setdefault(index, {})[key[len(_OWN_PREFIX):]] = value
                else:
                    base_state.setdefault(index, {})[key] = value
        groups = state_dict["param_groups"]
        self.base.load_state_dict({"state": base_state, "param_groups": groups})
        super().load_state_dict({"state": own_state, "param_groups": groups})
        self.param_groups = self.base.param_groups
