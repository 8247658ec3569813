"""The optimizer registry: one place that maps a name to a spec, builds it, and reports what it really uses.

Names:

- base optimizers (`baselines.BASELINES`): adam, adamw, sgd, lion, adafactor, adam_mini, galore_adamw;
- in-house optimizers: spam, stable_spam;
- compositions ``base+component+...`` over any base, with components moret, gradclip, adaclip, adagn, spikeclip
  (each at most once, applied in the canonical order of `compose` whatever their order in the name). Compositions
  over adam/adamw run on the in-house `SpikeAwareAdam` (torch's Adam/AdamW arithmetic unless ``adam_form="spam"``;
  adam takes weight decay as L2, adamw decoupled); compositions over the other bases wrap the package optimizer;
- aliases: ``adam_gradclip`` = ``adam+gradclip``;
- user optimizers, ``module:attr`` or a name from the ``bench.optimizers`` entry points, alone or with components
  (module `plugins`).

Only ``stable_spam`` and the in-house adam/adamw compositions with ``moret`` take Stable-SPAM's beta1/gamma1 schedule
(``total_steps``, ``eta_min``; `owns_schedule`); every other name rejects them. ``adam_mini`` compositions apply
AdaClip/AdaGN to the blocks the authors' Adam-mini variant applies them to (`COMPONENT_SCOPES`).

Names are case-insensitive and "-" reads as "_". Unknown names and unknown hyperparameters raise
`OptimizerConfigError` (a ValueError) naming the culprit and listing the valid choices; nothing is dropped.

Given an ``nn.Module``, the registry forms the papers' two parameter groups (`param_groups`): "matrix" (the 2-D
weights of nn.Linear layers, except embeddings and the LM head) and "other" (everything else). SPAM's ``density``
and GaLore's projection apply to the matrix group only. Given tensors or group dicts, they are used as they are
(density then applies to every 2-D tensor, GaLore's projection to the groups with role "matrix", or to the 2-D
tensors when no group has a role).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .baselines import BASELINES, GALORE_KEYS, Baseline, ParamInput
from .compose import ADAPTIVE_OFF, ComponentOptimizer, ComponentWrapper, Pipeline
from .fused import kernel_name
from .spam import SPAM
from .specs import COMPONENTS, IN_HOUSE_ADAM, SCHEDULE, STATE_DTYPE, component_defaults, pipeline_hparams
from .spike_aware import SpikeAwareAdam
from .stable_spam import StableSPAM

__all__ = [
    "ALIASES",
    "COMPONENT_HPARAMS",
    "PAPER_COMPOSITIONS",
    "OptimizerConfigError",
    "OptimizerSpec",
    "OptimizerUnavailableError",
    "available",
    "build",
    "catalog",
    "optimizer_class",
    "owns_schedule",
    "param_groups",
    "resolved_hparams",
    "spec",
]


class OptimizerConfigError(ValueError):
    """An unknown optimizer name or hyperparameter, or an invalid composition."""


class OptimizerUnavailableError(RuntimeError):
    """The optimizer's package is not installed or does not work here."""


# Hyperparameters each component adds to a composition, with their defaults (`specs`).
COMPONENT_HPARAMS: dict[str, dict[str, Any]] = {name: component_defaults([name]) for name in COMPONENTS}
# Stable-SPAM's schedule of beta1 and gamma1 (`specs.SCHEDULE`). Only the names that `owns_schedule` picks accept
# these: Stable-SPAM and the in-house Adam compositions with momentum reset (the ablation of Stable-SPAM's components,
# whose full row is Stable-SPAM). Every other name rejects them, so a task that passes `total_steps` cannot change its
# update rule: the authors' Adam+GradClip is torch's Adam (SPAM torchrun_main.py:354, 447) and their Lion and
# Adam-mini variants keep gamma1 fixed (StableSPAM utils/lions.py:113, galore_torch/adam_mini_ours.py:302).
SCHEDULE_HPARAMS: dict[str, Any] = {name: h.default for name, h in SCHEDULE.items()}
IN_HOUSE_BASES: tuple[str, ...] = ("adam", "adamw")
ALIASES: dict[str, str] = {"adam_gradclip": "adam+gradclip"}
# Rows of Stable-SPAM's Tables 3 and 4 (reference/paper_results.yaml), all buildable by these names.
PAPER_COMPOSITIONS: tuple[str, ...] = (
    "lion+adagn+adaclip",
    "adam_mini+adagn+adaclip",
    "adam+moret",
    "adam+moret+adaclip",
    "adam+moret+adagn",
    "adam+moret+adagn+adaclip",
    "adam+moret+adagn+spikeclip",
    "adam+moret+gradclip+adaclip",
)
IN_HOUSE: tuple[str, ...] = ("spam", "stable_spam")
# Hyperparameters that apply to the matrix group only when groups carry roles.
ROLE_SCOPED: frozenset[str] = frozenset({"density", *GALORE_KEYS})
_INTERNAL_GROUP_KEYS = frozenset({"params", "param_names", "name", "role", "global_step", "initial_lr", ADAPTIVE_OFF})

Factory = Callable[[ParamInput, dict[str, Any]], torch.optim.Optimizer]


@dataclass
class OptimizerSpec:
    """What the registry knows about one optimizer name."""

    name: str
    defaults: dict[str, Any]
    accepts: set[str]
    source: str
    needs_model: bool
    description: str
    base: str
    components: tuple[str, ...] = ()
    unavailable: str | None = None
    fused_kernel: bool = False
    factory: Factory | None = field(default=None, repr=False)
    accepts_any: bool = False  # a user optimizer with **kwargs: any hyperparameter name is passed on

    @property
    def available(self) -> bool:
        return self.unavailable is None


@dataclass(frozen=True)
class RegistryInfo:
    """Attached to every optimizer the registry builds (``opt.registry_info``)."""

    name: str
    base: str
    source: str
    hparams: dict[str, Any]


# --- parameter groups -------------------------------------------------------------------------------------------


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The papers' two groups: "matrix" (2-D weights of nn.Linear layers, not embeddings or the LM head) and
    "other" (embeddings, norms, head, biases, everything else). Empty groups are left out; frozen parameters too."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrix_ids: set[int] = set()
    for module_name, module in model.named_modules():
        lowered = module_name.lower()
        if isinstance(module, nn.Embedding) or "lm_head" in lowered or "embed" in lowered:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            matrix_ids.add(id(weight))
    matrix_ids -= embeddings
    matrix: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        is_matrix = id(p) in matrix_ids and "lm_head" not in lowered and "embed" not in lowered
        (matrix if is_matrix else other).append(p)
    groups: list[dict[str, Any]] = []
    if matrix:
        groups.append({"params": matrix, "role": "matrix"})
    if other:
        groups.append({"params": other, "role": "other"})
    return groups


def _param_input(params_or_model: Any) -> ParamInput:
    if isinstance(params_or_model, nn.Module):
        groups = param_groups(params_or_model)
        if not groups:
            raise ValueError("the model has no trainable parameters")
        return ParamInput(groups, params_or_model)
    if isinstance(params_or_model, torch.Tensor):
        return ParamInput([{"params": [params_or_model]}])
    items = list(params_or_model)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if isinstance(items[0], dict):
        groups = []
        for g in items:
            group = dict(g)
            ps = group["params"]
            group["params"] = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            groups.append(group)
        return ParamInput(groups)
    return ParamInput([{"params": items}])


def _scoped(inp: ParamInput, values: dict[str, Any], neutral: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups with role-scoped values: the matrix groups get `values`, other groups `neutral` (a group's own
    setting wins). Without roles the groups are returned unchanged (the values then act as defaults)."""
    if not inp.has_roles:
        return inp.groups
    out = []
    for g in inp.groups:
        extra = values if g.get("role") == "matrix" else neutral
        out.append({**extra, **g})
    return out


# --- specs --------------------------------------------------------------------------------------------------------


def _normalize(name: str) -> str:
    if not isinstance(name, str):
        raise OptimizerConfigError(f"an optimizer name must be a string, got {name!r}")
    return name.strip().lower().replace("-", "_").replace(" ", "")


def _signature_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if n not in ("self", "params", "fused")}


def _spam_factory(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
    groups = _scoped(inp, {"density": hp["density"]}, {"density": 1.0})
    return SPAM(groups, **hp)


def _stable_spam_factory(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return StableSPAM(inp.groups, **hp)


def _in_house_spec(name: str) -> OptimizerSpec:
    cls, factory, description = {
        "spam": (SPAM, _spam_factory, "SPAM: Adam + momentum reset with warmup + spike-aware clipping"),
        "stable_spam": (StableSPAM, _stable_spam_factory, "Stable-SPAM: Adam + MoRet + AdaGN + AdaClip"),
    }[name]
    defaults = _signature_defaults(cls)
    return OptimizerSpec(
        name=name,
        defaults=defaults,
        accepts=set(defaults),
        source=f"in-house ({cls.__module__}.{cls.__qualname__})",
        needs_model=False,
        description=description,
        base=name,
        fused_kernel=True,
        factory=factory,
    )


def _baseline_spec(name: str) -> OptimizerSpec:
    b = BASELINES[name]
    return OptimizerSpec(
        name=name,
        defaults=dict(b.defaults),
        accepts=b.accepts,
        source=b.source,
        needs_model=b.needs_model,
        description=b.description,
        base=name,
        unavailable=b.unavailable_reason(),
        factory=b.factory,
    )


def _scope_adam_mini(opt: torch.optim.Optimizer) -> None:
    """AdaClip/AdaGN on the blocks the authors' Adam-mini variant gives them (StableSPAM
    galore_torch/adam_mini_ours.py:227-259 biases, 272-308 queries and keys, 373-424 the remaining blocks, i.e. the
    norms) and off on embeddings, LM head, values, attention output and MLP blocks (:331-371). Adam-mini keeps one
    param group per named block and the block-name sets of its own partition, which this reads."""
    plain = (opt.embd_names | opt.output_names | opt.wv_names | opt.mlp_names  # type: ignore[attr-defined]
             | opt.attn_proj_names)  # type: ignore[attr-defined]
    adaptive = opt.adam_block_names | opt.wqk_names  # type: ignore[attr-defined]
    for group in opt.param_groups:
        name = group["name"]
        group[ADAPTIVE_OFF] = not any(n in name for n in adaptive) and any(n in name for n in plain)


# Package bases whose authors' component variant applies AdaClip/AdaGN to part of the model only.
COMPONENT_SCOPES: dict[str, Callable[[torch.optim.Optimizer], None]] = {"adam_mini": _scope_adam_mini}


def owns_schedule(base: str, components: tuple[str, ...]) -> bool:
    """Whether the composition `base+components` takes Stable-SPAM's beta1/gamma1 schedule (`SCHEDULE_HPARAMS`)."""
    return base in IN_HOUSE_BASES and "moret" in components


def _composite_spec(name: str, base: str, components: tuple[str, ...], baseline: Baseline | None = None
                    ) -> OptimizerSpec:
    b = baseline or BASELINES[base]
    if base in IN_HOUSE_BASES:
        defaults = {
            **IN_HOUSE_ADAM,
            "weight_decay": b.defaults["weight_decay"],
            **component_defaults(components),
            **(SCHEDULE_HPARAMS if owns_schedule(base, components) else {}),
        }

        def factory(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
            groups = _scoped(inp, {"density": hp["density"]}, {"density": 1.0})
            return SpikeAwareAdam(groups, components=components, decoupled_weight_decay=base == "adamw", **hp)

        source = "in-house (optimizers.spike_aware.SpikeAwareAdam)"
        unavailable = None
    else:
        defaults = {**b.defaults, **component_defaults(components, package=True), "state_dtype": STATE_DTYPE.default}
        base_keys = b.accepts

        def factory(inp: ParamInput, hp: dict[str, Any]) -> torch.optim.Optimizer:
            base_hp = {k: v for k, v in hp.items() if k in base_keys}
            rest = {k: v for k, v in hp.items() if k not in base_keys}
            wide = pipeline_hparams()
            pipeline = Pipeline(components=frozenset(components), **{k: rest.pop(k) for k in list(rest) if k in wide})
            base_opt = b.factory(inp, base_hp)
            scope = COMPONENT_SCOPES.get(base)
            if scope is not None and {"adaclip", "adagn"} & set(components):
                scope(base_opt)
            return ComponentWrapper(base_opt, pipeline, b.layout, **rest)

        source = f"in-house components over {b.source}"
        unavailable = b.unavailable_reason()
    return OptimizerSpec(
        name=name,
        defaults=defaults,
        accepts=set(defaults),
        source=source,
        needs_model=b.needs_model,
        description=f"{base} with {', '.join(components)}",
        base=base,
        components=components,
        unavailable=unavailable,
        fused_kernel=base in IN_HOUSE_BASES,
        factory=factory,
    )


def _valid_names() -> str:
    from .plugins import installed

    return (f"{', '.join([*BASELINES, *IN_HOUSE, *ALIASES, *installed()])}, or base+component+... with a base "
            f"among {', '.join(BASELINES)} and components among {', '.join(COMPONENTS)}, or an import path "
            "module:Optimizer")


def spec(name: str) -> OptimizerSpec:
    """The spec of an optimizer name (raises OptimizerConfigError for unknown names)."""
    from .plugins import user_spec

    user = user_spec(name)  # `module:attr` names and the bench.optimizers entry points (module `plugins`)
    if user is not None:
        return user
    key = _normalize(name)
    target = ALIASES.get(key, key)
    if "+" in target:
        base, *parts = target.split("+")
        components = [c for c in parts if c]
        if base not in BASELINES:
            raise OptimizerConfigError(f"unknown base optimizer {base!r} in {name!r}; valid bases: "
                                       f"{', '.join(BASELINES)}")
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown or not components:
            what = f"unknown component(s) {unknown}" if unknown else "no component"
            raise OptimizerConfigError(f"{what} in {name!r}; valid components: {', '.join(COMPONENTS)}")
        if len(set(components)) != len(components):
            raise OptimizerConfigError(f"a component appears twice in {name!r}")
        return _composite_spec(key, base, tuple(components))
    if key in IN_HOUSE:
        return _in_house_spec(key)
    if key in BASELINES:
        return _baseline_spec(key)
    raise OptimizerConfigError(f"unknown optimizer {name!r}; valid names: {_valid_names()}")


def available() -> list[str]:
    """Names that build here: base optimizers whose packages are installed, spam, stable_spam, adam_gradclip and
    the papers' named compositions (any other base+component name is parsed on demand)."""
    ok = {n for n, b in BASELINES.items() if b.unavailable_reason() is None}
    names = [n for n in BASELINES if n in ok] + list(IN_HOUSE)
    names += [a for a, target in ALIASES.items() if target.split("+")[0] in ok]
    names += [c for c in PAPER_COMPOSITIONS if c.split("+")[0] in ok]
    return names


def catalog() -> dict[str, str]:
    """Every registered name with its provenance, or "unavailable because ..." where it cannot be built."""
    out: dict[str, str] = {}
    for name in [*BASELINES, *IN_HOUSE, *ALIASES, *PAPER_COMPOSITIONS]:
        s = spec(name)
        out[name] = s.source if s.available else f"{s.unavailable} ({s.source})"
    return out


# --- building -----------------------------------------------------------------------------------------------------


def _check_known(s: OptimizerSpec, hparams: dict[str, Any]) -> None:
    if s.accepts_any:
        return
    allowed = s.accepts | ({"fused"} if s.fused_kernel else set())
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise OptimizerConfigError(
            f"optimizer {s.name!r} does not accept hyperparameter(s) {', '.join(map(repr, unknown))}; "
            f"valid hyperparameters: {', '.join(sorted(allowed))}"
        )


def build(name: str, params_or_model: Any, **hparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer `name` over a model, an iterable of tensors, or a list of param-group dicts.

    Hyperparameters not given take the spec's defaults; unknown ones raise OptimizerConfigError. Names with
    ``fused_kernel`` (the in-house Adam family) also take the build option ``fused`` (None: the fused GPU step where
    it applies; True: require it; False: the foreach path); `resolved_hparams` reports the path as ``fused_active``.
    """
    s = spec(name)
    _check_known(s, hparams)
    if not s.available:
        raise OptimizerUnavailableError(f"optimizer {s.name!r} is {s.unavailable}")
    if s.needs_model and not isinstance(params_or_model, nn.Module):
        raise OptimizerConfigError(f"optimizer {s.name!r} is built from the model: pass the nn.Module, not tensors")
    hp = {**s.defaults, **hparams}
    if "fused" in hp and hp["fused"] is None:
        del hp["fused"]
    inp = _param_input(params_or_model)
    assert s.factory is not None
    opt = s.factory(inp, hp)
    opt.registry_info = RegistryInfo(name=s.name, base=s.base, source=s.source, hparams=dict(hp))  # type: ignore[attr-defined]
    return opt


def optimizer_class(name: str, **hparams: Any) -> type[torch.optim.Optimizer]:
    """A `torch.optim.Optimizer` subclass for libraries that construct the optimizer themselves.

    ``cls(params, lr=..., **kwargs)`` and ``cls(params=..., lr=..., **kwargs)`` both return
    ``build(name, params, **{**hparams, **kwargs})`` (the call's keywords win), an instance of the registry's class.
    """
    s = spec(name)
    _check_known(s, hparams)
    fixed = dict(hparams)

    def __new__(cls: type, params: Any = None, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if args:
            raise TypeError(f"{cls.__name__} takes the parameters positionally and hyperparameters as keywords")
        if params is None:
            raise TypeError(f"{cls.__name__} needs the parameters to optimize")
        return build(s.name, params, **{**fixed, **kwargs})

    title = "".join(part.capitalize() for part in s.name.replace("+", "_").split("_"))
    return type(f"Registry{title}", (torch.optim.Optimizer,), {"__new__": __new__, "__module__": __name__,
                                                               "registry_name": s.name, "registry_hparams": fixed})


# --- resolved hyperparameters -----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else str(value.tolist())
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _group_hparams(groups: Iterable[dict[str, Any]]) -> dict[str, Any]:
    groups = list(groups)
    keys: list[str] = []
    for g in groups:
        keys.extend(k for k in g if k not in _INTERNAL_GROUP_KEYS and k not in keys)
    out: dict[str, Any] = {}
    for key in keys:
        scope = [(i, g) for i, g in enumerate(groups) if key in g]
        if key in ROLE_SCOPED and any(g.get("role") == "matrix" for _, g in scope):
            scope = [(i, g) for i, g in scope if g.get("role") == "matrix"]
        values = [_plain(g[key]) for _, g in scope]
        if all(_equal(v, values[0]) for v in values):
            out[key] = values[0]
            continue
        labels = [g.get("role", f"group{i}") for i, g in scope]
        if len(set(labels)) == len(labels) and len(labels) <= 8:
            for label, v in zip(labels, values, strict=True):
                out[f"{key}/{label}"] = v
        else:
            distinct: list[Any] = []
            for v in values:
                if not any(_equal(v, d) for d in distinct):
                    distinct.append(v)
            out[key] = "mixed: " + ", ".join(map(str, distinct))
    return out


def _canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def verify(opt: torch.optim.Optimizer, name: str, requested: dict[str, Any], where: str = "the optimizer") -> dict[
        str, Any]:
    """Check that `opt` (found `where`, e.g. inside a library's model) is the registry's `name` and that every
    requested hyperparameter reached it; return its resolved hyperparameters. RuntimeError naming what is off."""
    info: RegistryInfo | None = getattr(opt, "registry_info", None)
    wanted = spec(name).name
    if info is None or info.name != wanted:
        built_as = f"registry {info.name!r}" if info is not None else "not the registry's"
        raise RuntimeError(f"{where} is {type(opt).__qualname__} ({built_as}), not the registry's {wanted!r}")
    resolved = resolved_hparams(opt)
    wrong = {k: (v, resolved.get(k, "<missing>")) for k, v in requested.items()
             if _canonical(resolved.get(k)) != _canonical(v)}
    if wrong:
        detail = ", ".join(f"{k}: requested {want!r}, optimizer has {got!r}" for k, (want, got) in wrong.items())
        raise RuntimeError(f"hyperparameters did not reach {where} ({type(opt).__name__}): {detail}")
    return resolved


def resolved_hparams(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What the optimizer really uses, read back from it (param groups and settings), flat, for logging at step 0.

    Keys are the hyperparameter names `build` accepts (plus the optimizer's other settings); tuple-valued
    hyperparameters (betas, Adafactor's eps) stay tuples. A group-level value that differs between groups is
    reported per role (``lr/matrix``), role-scoped ones (density, GaLore's projection) from the matrix group.
    Also: ``optimizer`` (registry name or class), ``source`` (provenance) and ``param_groups`` (count).
    """
    info: RegistryInfo | None = getattr(opt, "registry_info", None)
    out: dict[str, Any] = {
        "optimizer": info.name if info else type(opt).__name__,
        "source": info.source if info else f"{type(opt).__module__}.{type(opt).__qualname__}",
    }
    inner = opt.base if isinstance(opt, ComponentWrapper) else opt
    out.update(_group_hparams(opt.param_groups))
    if info is not None:
        base = BASELINES.get(info.base)
        if base is not None and base.readback is not None:
            base.readback(inner, out)
    if isinstance(opt, ComponentOptimizer):
        out.update(opt.pipeline.describe())
    if isinstance(opt, SpikeAwareAdam):
        out["adam_form"] = opt.adam_form
        out["decoupled_weight_decay"] = opt.decoupled_weight_decay
        if "density" in opt.defaults:
            out["seed"] = opt.seed
        out["fused"] = opt.fused
        active, reason = opt.fused_status()
        out["fused_active"] = active
        if not active:
            out["fused_reason"] = reason
    if isinstance(opt, StableSPAM):
        out["variant"] = opt.variant
    if isinstance(opt, ComponentWrapper):
        off = sum(bool(g.get(ADAPTIVE_OFF)) for g in opt.param_groups)
        if off:
            out["adaptive_off_groups"] = off
        out["base_class"] = f"{type(inner).__module__}.{type(inner).__qualname__}"
    out["kernel"] = kernel_name(inner)
    out["param_groups"] = len(opt.param_groups)
    return out
