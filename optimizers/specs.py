"""One spec per component and per in-house base: its hyperparameters, their defaults and checks, and its state.

The composition pipeline (`compose`), the in-house Adam (`spike_aware`), SPAM and Stable-SPAM (their signatures), the
registry and `bench list optimizers` all read these tables; a default is written here and nowhere else. Adding a
component: its `ComponentSpec` in `COMPONENT_SPECS` (in its place in the application order) and its update rule in
`functional` and `compose`.

A hyperparameter is optimizer-wide (`Hparam.per_group` False: kept in `compose.Pipeline`) or per tensor (True: kept in
every param group). ``check`` returns what a valid value must be, or None when the value is valid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMPONENTS",
    "COMPONENT_SPECS",
    "IN_HOUSE_ADAM",
    "MORET_MODES",
    "SCHEDULE",
    "SPAM_DEFAULTS",
    "STABLE_SPAM_DEFAULTS",
    "STATE_DTYPE",
    "STATE_DTYPES",
    "ComponentSpec",
    "Hparam",
    "check_value",
    "component_defaults",
    "default",
    "describe",
    "pipeline_hparams",
]

MORET_MODES: tuple[str, ...] = ("stable_spam", "clean", "spam")
STATE_DTYPES: tuple[str, ...] = ("param", "float32")


def _positive_int(value: Any) -> str | None:
    return None if int(value) == value and value >= 1 else "must be a positive integer"


def _non_negative_int(value: Any) -> str | None:
    return None if int(value) == value and value >= 0 else "must be a non-negative integer"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be non-negative"


def _unit_interval(value: Any) -> str | None:
    return None if 0.0 <= value < 1.0 else "must lie in [0, 1)"


def _closed_unit_interval(value: Any) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must lie in [0, 1]"


def _optional_positive_int(value: Any) -> str | None:
    return None if value is None or (int(value) == value and value >= 1) else "must be None or a positive integer"


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"is not one of {', '.join(choices)}"

    return check


@dataclass(frozen=True)
class Hparam:
    """One hyperparameter: its default (with the source that sets it) and what a valid value is."""

    default: Any
    check: Callable[[Any], str | None] | None = None
    per_group: bool = False
    source: str = ""


def check_value(name: str, hparam: Hparam, value: Any) -> None:
    """ValueError naming `name` when `value` fails the check of `hparam`."""
    problem = hparam.check(value) if hparam.check is not None else None
    if problem is None:
        return
    if problem.startswith("is not one of"):
        raise ValueError(f"{name}={value!r} {problem}")
    raise ValueError(f"{name} {problem}, got {value!r}")


@dataclass(frozen=True)
class ComponentSpec:
    """A component: what it does, its hyperparameters (all compositions), those it adds over a package base only,
    and the per-tensor state it keeps (key: "counter" for an int, "scalar" for a 0-d tensor, "like_param")."""

    name: str
    summary: str
    hparams: dict[str, Hparam]
    package_hparams: dict[str, Hparam] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    package_state: dict[str, str] = field(default_factory=dict)


_STABLE_SPAM = "Stable-SPAM's signature (DESIGN.md, Algorithms)"
# In the canonical order of `compose` (moret acts on the base's state; the others transform the gradient in this order).
COMPONENT_SPECS: dict[str, ComponentSpec] = {
    spec.name: spec
    for spec in (
        ComponentSpec(
            "moret",
            "momentum reset every reset_interval steps (the base's moments; SPAM's post-reset warmup optional)",
            {
                "reset_interval": Hparam(1000, _positive_int, source="Stable-SPAM's ΔT (DESIGN.md, Algorithms)"),
                "moret_mode": Hparam("stable_spam", _one_of(MORET_MODES)),
                "warmup_steps": Hparam(0, _non_negative_int),
            },
        ),
        ComponentSpec(
            "gradclip",
            "global-norm gradient clipping",
            {"max_norm": Hparam(1.0, _positive, source="the papers' Adam+GradClip (SPAM torchrun_main.py:447)")},
        ),
        ComponentSpec(
            "adaclip",
            "Stable-SPAM's adaptive spike clipping",
            {"gamma3": Hparam(0.999, _unit_interval, per_group=True, source=_STABLE_SPAM)},
            state={"stat_step": "counter", "clip_threshold": "scalar"},
        ),
        ComponentSpec(
            "adagn",
            "Stable-SPAM's adaptive gradient-norm scaling",
            {
                "gamma1": Hparam(0.7, _unit_interval, per_group=True, source=_STABLE_SPAM),
                "gamma2": Hparam(0.9, _unit_interval, per_group=True, source=_STABLE_SPAM),
            },
            package_hparams={"adagn_eps": Hparam(1e-8, _non_negative, per_group=True)},
            state={"stat_step": "counter", "gn_mean": "scalar", "gn_sq_mean": "scalar"},
        ),
        ComponentSpec(
            "spikeclip",
            "SPAM's spike-aware clipping against the second moment",
            {"threshold": Hparam(5000.0, _positive, per_group=True, source="SPAM's θ (DESIGN.md, Algorithms)")},
            package_hparams={"spike_beta2": Hparam(0.999, _unit_interval, per_group=True)},
            package_state={"spike_exp_avg_sq": "like_param"},
        ),
    )
}
COMPONENTS: tuple[str, ...] = tuple(COMPONENT_SPECS)

# Stable-SPAM's cosine schedule of beta1 and gamma1 (the authors' `total_T`, `eta_min`; StableSPAM
# galore_torch/stablespam.py:43-44, 136, 165); only the names of `registry.owns_schedule` take it.
SCHEDULE: dict[str, Hparam] = {
    "total_steps": Hparam(None, _optional_positive_int),
    "eta_min": Hparam(0.5, _closed_unit_interval, source="StableSPAM galore_torch/stablespam.py:44"),
}

# Where component state and gradient copies are kept (`compose.compute_dtype`).
STATE_DTYPE = Hparam("param", _one_of(STATE_DTYPES))

# The in-house Adam under the adam/adamw compositions: torch.optim.Adam's defaults and arithmetic.
IN_HOUSE_ADAM: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "adam_form": "torch",
    "density": 1.0,
    "seed": 0,
    "state_dtype": STATE_DTYPE.default,
}

# SPAM's signature (DESIGN.md, Algorithms: eps 1e-6, ΔT 500, N 150, θ 5000).
SPAM_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "reset_interval": 500,
    "warmup_steps": 150,
    "threshold": COMPONENT_SPECS["spikeclip"].hparams["threshold"].default,
    "density": 1.0,
}

# Stable-SPAM's signature (DESIGN.md, Algorithms).
STABLE_SPAM_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    **{k: COMPONENT_SPECS["adagn"].hparams[k].default for k in ("gamma1", "gamma2")},
    "gamma3": COMPONENT_SPECS["adaclip"].hparams["gamma3"].default,
    "reset_interval": COMPONENT_SPECS["moret"].hparams["reset_interval"].default,
    **{k: h.default for k, h in SCHEDULE.items()},
}


def component_defaults(components: Iterable[str], *, package: bool = False) -> dict[str, Any]:
    """The hyperparameters (with defaults) that `components` add to a composition, over a package base if set."""
    out: dict[str, Any] = {}
    for name in components:
        spec = COMPONENT_SPECS[name]
        out.update({k: h.default for k, h in spec.hparams.items()})
        if package:
            out.update({k: h.default for k, h in spec.package_hparams.items()})
    return out


def pipeline_hparams() -> dict[str, Hparam]:
    """The optimizer-wide hyperparameters of `compose.Pipeline`, by name (components' and the schedule's)."""
    out = {k: h for spec in COMPONENT_SPECS.values() for k, h in spec.hparams.items() if not h.per_group}
    return {**out, **SCHEDULE, "state_dtype": STATE_DTYPE}


def default(name: str) -> Any:
    """The default of the component or schedule hyperparameter `name`."""
    for spec in COMPONENT_SPECS.values():
        for table in (spec.hparams, spec.package_hparams):
            if name in table:
                return table[name].default
    return {**SCHEDULE, "state_dtype": STATE_DTYPE}[name].default


def describe() -> str:
    """One line per component: its summary and its hyperparameters with defaults (for `bench list optimizers`)."""
    lines = []
    for spec in COMPONENT_SPECS.values():
        hparams = ", ".join(f"{k}={h.default!r}" for k, h in {**spec.hparams, **spec.package_hparams}.items())
        lines.append(f"  {spec.name}: {spec.summary} ({hparams})")
    return "\n".join(lines)
