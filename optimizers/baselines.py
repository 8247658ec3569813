"""Baseline optimizers from well-kept packages, and what the registry needs to know about each.

Every entry names the package and class it builds, its default hyperparameters (the papers' settings where they
give one), how it is built (from parameter groups or from the model), where its state keeps what ``moret`` resets,
and how to read its hyperparameters back. Packages are imported only when an optimizer is built.

- ``adam``, ``adamw``, ``sgd``: torch.optim (SGD with momentum 0.9); adam and adamw take torch's fused kernel on CUDA
  when `fused.AUTO_SELECT` is on (`fused.torch_adam_fused`).
- ``adafactor``: transformers' Adafactor as configured in the papers: eps (1e-30, 1e-3), clip_threshold 1.0,
  decay_rate -0.8, beta1 0.9, an external learning rate (relative_step=False, scale_parameter=False,
  warmup_init=False).
- ``adam_mini``: package ``adam-mini``, built from the model's named parameters with ``dim``/``n_heads`` (given, or
  read from a transformers config's hidden_size / num_attention_heads / num_key_value_heads). Its per-parameter
  prints are captured and sent to the debug log. Adam-mini assumes a distributed run whenever more than one GPU is
  visible; the wrapper sets its world size from torch.distributed (1 when not initialized).
- ``lion``: package ``lion-pytorch``.
- ``galore_adamw``: package ``galore-torch`` (needs ``bitsandbytes`` to import): GaLore's AdamW with the projection
  (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) on the matrix group (on the 2-D tensors when no roles are
  given). Defaults are GaLore's LLaMA-60M settings.

State zeroed by ``moret`` (`compose.BaseStateLayout`): adam/adamw ``exp_avg``, ``exp_avg_sq`` (counter ``step``);
sgd ``momentum_buffer``; lion ``exp_avg``; adafactor ``exp_avg``, ``exp_avg_sq_row``, ``exp_avg_sq_col``,
``exp_avg_sq`` (counter ``step``); adam_mini ``m``, ``v``, ``vmean`` (counter ``step``); galore_adamw ``exp_avg``,
``exp_avg_sq`` (counter ``step``; GaLore also recomputes its projection when its counter is a multiple of
``update_proj_gap``, so a restarted counter refreshes the projection).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compose import BaseStateLayout
from .fused import torch_adam_fused

__all__ = ["BASELINES", "Baseline", "ParamInput", "package_version"]

log = logging.getLogger(__name__)


def package_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None (without importing it)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class ParamInput:
    """What `build` was given, normalized: parameter groups (each may carry a ``role``) and the model, if any."""

    groups: list[dict[str, Any]]
    model: nn.Module | None = None

    @property
    def has_roles(self) -> bool:
        return any("role" in g for g in self.groups)


@dataclass(frozen=True)
class Baseline:
    """One base optimizer: provenance, defaults, construction and state layout."""

    name: str
    target: str
    distribution: str | None
    defaults: dict[str, Any]
    layout: BaseStateLayout
    factory: Callable[[ParamInput, dict[str, Any]], torch.optim.Optimizer]
    needs_model: bool = False
    modules: tuple[str, ...] = ()
    readback: Callable[[torch.optim.Optimizer, dict[str, Any]], None] | None = None
    description: str = ""
    extra_accepts: frozenset[str] = field(default_factory=frozenset)

    @property
    def accepts(self) -> set[str]:
        return set(self.defaults) | set(self.extra_accepts)

    @property
    def source(self) -> str:
        if self.distribution is None:
            return f"in-house ({self.target})"
        version = package_version(self.distribution)
        return f"{self.distribution} {version or '(not installed)'} ({self.target})"

    def unavailable_reason(self) -> str | None:
        """Why this baseline cannot be built here, or None if its packages are installed."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            return f"unavailable because the module(s) {', '.join(missing)} are not installed"
        return None


# --- factories --------------------------------------------------------------------------------------------------


def _torch_factory(cls_name: str) -> Callable[[ParamInput, dict[str, Any]], torch.optim.Optimizer]:
    def build(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
        cls = getattr(torch.optim, cls_name)
        if cls_name in ("Adam", "AdamW") and torch_adam_fused(inp.groups):
            hp = {**hp, "fused": True}
        return cls(inp.groups, **hp)

    return build


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Keep bitsandbytes' import-time notices (e.g. about optional CPU kernels) out of the logs."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _build_lion(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(inp.groups, **hp)


def _build_adafactor(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
    with _quiet_import():
        from transformers.optimization import Adafactor

    return Adafactor(inp.groups, **hp)


def model_dims(model: nn.Module | None) -> dict[str, int | None]:
    """dim, n_heads, n_kv_heads from a transformers-style ``model.config`` (None where absent)."""
    config = getattr(model, "config", None)
    dim = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    return {"dim": dim, "n_heads": heads, "n_kv_heads": kv_heads}


def _build_adam_mini(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
    if inp.model is None:
        raise ValueError("adam_mini is built from the model (its parameter names and shapes): pass an nn.Module")
    from adam_mini import Adam_mini

    hp = dict(hp)
    inferred = model_dims(inp.model)
    given = {k: hp.pop(k, None) for k in ("dim", "n_heads", "n_kv_heads")}
    kwargs = {k: v if v is not None else inferred[k] for k, v in given.items()}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        opt = Adam_mini(named_parameters=inp.model.named_parameters(), verbose=False, **kwargs, **hp)
    if captured.getvalue():
        log.debug("adam-mini: %s", captured.getvalue().strip())
    dist = torch.distributed
    opt.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    matrix = {id(p) for g in inp.groups if g.get("role") == "matrix" for p in g["params"]}
    if inp.has_roles:
        for group in opt.param_groups:
            group["role"] = "matrix" if all(id(p) in matrix for p in group["params"]) else "other"
    return opt


def _readback_adam_mini(opt: torch.optim.Optimizer, out: dict[str, Any]) -> None:
    out.pop("beta1", None)
    out.pop("beta2", None)
    group = opt.param_groups[0]
    out["betas"] = (group["beta1"], group["beta2"])
    # Adam-mini sets weight decay to 0 for norms and biases; the requested value is the one on the other blocks.
    out["weight_decay"] = max(float(g["weight_decay"]) for g in opt.param_groups)
    out["dim"] = opt.dim
    out["n_heads"] = opt.n_heads
    out["n_kv_heads"] = opt.n_kv_heads


GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def _build_galore(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        with _quiet_import():
            from galore_torch import GaLoreAdamW
    except Exception as exc:  # an import failure of a dependency is reported as unavailability
        raise RuntimeError(f"galore_adamw is unavailable because importing galore_torch failed: {exc}") from exc
    hp = dict(hp)
    projection = {k: hp.pop(k) for k in GALORE_KEYS}
    groups: list[dict[str, Any]] = []
    if inp.has_roles:
        for g in inp.groups:
            groups.append({**projection, **g} if g.get("role") == "matrix" else dict(g))
    else:
        for g in inp.groups:
            matrices = [p for p in g["params"] if p.dim() == 2]
            others = [p for p in g["params"] if p.dim() != 2]
            extra = {k: v for k, v in g.items() if k != "params"}
            if matrices:
                groups.append({**projection, **extra, "params": matrices, "role": "matrix"})
            if others:
                groups.append({**extra, "params": others, "role": "other"})
    return GaLoreAdamW(groups, no_deprecation_warning=True, **hp)


# --- the table ----------------------------------------------------------------------------------------------------

_ADAM_LAYOUT = BaseStateLayout(("exp_avg", "exp_avg_sq"), "step")

BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in [
        Baseline(
            name="adam",
            target="torch.optim.Adam",
            distribution="torch",
            defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
            layout=_ADAM_LAYOUT,
            factory=_torch_factory("Adam"),
            description="Adam (weight decay as L2, torch semantics)",
        ),
        Baseline(
            name="adamw",
            target="torch.optim.AdamW",
            distribution="torch",
            defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
            layout=_ADAM_LAYOUT,
            factory=_torch_factory("AdamW"),
            description="AdamW (decoupled weight decay)",
        ),
        Baseline(
            name="sgd",
            target="torch.optim.SGD",
            distribution="torch",
            defaults={"lr": 1e-2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
            layout=BaseStateLayout(("momentum_buffer",)),
            factory=_torch_factory("SGD"),
            description="SGD with momentum",
        ),
        Baseline(
            name="lion",
            target="lion_pytorch.Lion",
            distribution="lion-pytorch",
            defaults={"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
            layout=BaseStateLayout(("exp_avg",)),
            factory=_build_lion,
            modules=("lion_pytorch",),
            description="Lion (sign of an interpolated momentum)",
        ),
        Baseline(
            name="adafactor",
            target="transformers.optimization.Adafactor",
            distribution="transformers",
            defaults={
                "lr": 1e-3,
                "eps": (1e-30, 1e-3),
                "clip_threshold": 1.0,
                "decay_rate": -0.8,
                "beta1": 0.9,
                "weight_decay": 0.0,
                "scale_parameter": False,
                "relative_step": False,
                "warmup_init": False,
            },
            layout=BaseStateLayout(("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"), "step"),
            factory=_build_adafactor,
            modules=("transformers",),
            description="Adafactor as configured in the papers (external lr)",
        ),
        Baseline(
            name="adam_mini",
            target="adam_mini.Adam_mini",
            distribution="adam-mini",
            defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "dim": None,
                      "n_heads": None, "n_kv_heads": None},
            layout=BaseStateLayout(("m", "v", "vmean"), "step"),
            factory=_build_adam_mini,
            needs_model=True,
            modules=("adam_mini",),
            readback=_readback_adam_mini,
            description="Adam-mini (one second moment per block), built from the model",
        ),
        Baseline(
            name="galore_adamw",
            target="galore_torch.GaLoreAdamW",
            distribution="galore-torch",
            defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "rank": 128,
                      "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
            layout=_ADAM_LAYOUT,
            factory=_build_galore,
            modules=("galore_torch", "bitsandbytes", "transformers"),
            description="GaLore AdamW (low-rank gradient projection on the matrix group)",
        ),
    ]
}
