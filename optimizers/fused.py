"""Fused GPU steps (Triton) for SPAM and Stable-SPAM, checked against the foreach path of `functional.py`.

Two update rules of `spike_aware.SpikeAwareAdam` have a fused step:

- ``spam``: components within {moret, spikeclip}, ``adam_form="spam"``, moret_mode "spam", decoupled weight decay
  (SPAM and the registry's ``adamw+moret+spikeclip`` with those settings). One launch per bucket reads p, g, m, v and
  writes p, m, v: moments zeroed on the reset step, spike clip against v before the update (only when the step
  context says clipping is active), Adam in SPAM's form with the warmup factor, then p <- p * (1 - lr * wd).
- ``stable_spam``: components within {moret, adaclip, adagn} (moret in mode "stable_spam" or "clean"),
  ``adam_form="torch"`` (StableSPAM, its ablations ``adamw+moret+adagn+adaclip``, ``adamw+adaclip``, ``adamw+adagn``,
  ``adamw+moret``..., and ``adam+...`` without weight decay). Up to five launches per bucket: one read of the
  gradient for the per-tensor max |g| and sum of squares; AdaClip's thresholds (adaclip); with adaclip and adagn, the
  squares of the clipped entries, re-read only in the rows that hold entries above a floor of AdaClip's threshold
  that the first read computes from the old one (in a step without a spike, a few rows per tensor); AdaGN's moments
  and factors (adagn); the update (clip, AdaGN scale, decoupled weight decay, Adam in torch form, moret). So the step
  moves about the bytes of Adam's update plus one read of the gradient.

The launch count does not grow with the number of tensors: every kernel covers all tensors of a bucket (one param
group, one dtype, tensors whose counters agree) through a block table and tables of tensor addresses (`_Plan`, built
once and kept while the tensors stay; gradient addresses are re-sent, without a host sync, only when they change).
Every scalar that depends only on counters (bias corrections, step sizes, warmup, schedule) is computed on the host
from the same counters as the foreach path; data-dependent scalars stay on the device, so no step syncs the host with
the device. Kernels read the gradient from ``p.grad`` (no copy, left untouched). They compute in float32 and, for
bfloat16 state, round where the foreach path rounds, so the paths agree up to float32 ties (`step_tolerance`). The
state (keys, dtypes, counters) is the foreach path's, so a state dict moves between the two paths.

Tensors the kernels do not take (sparse-momentum subsets, non-contiguous tensors, tensors not 16-byte aligned) go
through the foreach path in the same step. The fused path is used when triton can be imported, the configuration is
supported and the parameters are CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1`` when ``fused=True`` is
requested).

`AUTO_SELECT` is the one switch for ``fused=None``: off, the fused step runs only when asked for with ``fused=True``;
on, it runs on CUDA whenever it applies. It is on: the CUDA tests (113 passed) and ``python -m optimizers.benchmark
--check`` (12 of 12 configurations) passed on one H200 with torch 2.11 and Triton 3.6 (`results/perf/README.md`;
``optimizers/gpu_check.sh`` runs both).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import functional as F
from .compose import Bucket, StepContext

if TYPE_CHECKING:
    from .spike_aware import SpikeAwareAdam

__all__ = [
    "compare_paths",
    "config_kind",
    "device_supported",
    "fused_step",
    "step_tolerance",
    "torch_adam_fused",
    "interpret_mode",
    "kernel_name",
    "triton_unavailable_reason",
    "unsupported_params",
]

BLOCK = 2048
NUM_WARPS = 8
ALIGN = 16  # bytes: the alignment the kernels assume of every tensor they take
SCALAR_BLOCK = 128  # tensors per program of the per-tensor statistics kernels
REDUCE_BLOCKS = 8  # BLOCKs per program of the gradient reductions (a row of the coarse table)
# float32 per tensor: max |g|, sum of squares, AdaClip's T_hat and ratio, AdaGN's factor, the floor of T_hat
SCRATCH_ROWS = 6
# Parameter dtypes the kernels take (others, e.g. float64, keep the foreach path: the kernels compute in float32).
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
SPAM_COMPONENTS = frozenset({"moret", "spikeclip"})
STABLE_COMPONENTS = frozenset({"adaclip", "adagn"})

_triton_reason: str | None = None
_triton_checked = False
AUTO_SELECT = True  # fused=None takes the fused step on CUDA (see the module docstring)
_kernels: Any = None  # the module `_triton_kernels`, imported on first use


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason() -> str | None:
    """None when triton can be imported, else why not (the import is attempted once)."""
    global _triton_reason, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken installation
            _triton_reason = f"triton is not importable ({type(exc).__name__}: {exc})"
    return _triton_reason


def unsupported_params(params: list[Tensor], forced: bool) -> str | None:
    """None when every parameter has a device and a dtype the fused step takes, else which ones do not."""
    devices = sorted({str(p.device) for p in params if not device_supported(p.device, forced)})
    if devices:
        return (f"parameters on {', '.join(devices)} (the fused step needs CUDA tensors; CPU tensors only under "
                "TRITON_INTERPRET=1 with fused=True)")
    dtypes = sorted({str(p.dtype) for p in params if p.dtype not in DTYPES})
    if dtypes:
        return f"parameters of dtype {', '.join(dtypes)} (the fused step takes float32 and bfloat16 parameters)"
    return None


def device_supported(device: torch.device, forced: bool) -> bool:
    """CUDA devices; CPU only under the Triton interpreter and only when the fused path is requested explicitly."""
    return device.type == "cuda" or (forced and device.type == "cpu" and interpret_mode())


def config_kind(opt: SpikeAwareAdam) -> tuple[str | None, str | None]:
    """("spam" or "stable_spam", None) for a configuration with a fused step, else (None, why not)."""
    cfg = opt.pipeline
    comps = set(cfg.components)
    moret = "moret" in comps
    if comps <= SPAM_COMPONENTS and opt.adam_form == "spam":
        if moret and cfg.moret_mode != "spam":
            return None, f"the fused SPAM step needs moret_mode='spam', not {cfg.moret_mode!r}"
        if not opt.decoupled_weight_decay and any(g["weight_decay"] != 0 for g in opt.param_groups):
            return None, "the fused SPAM step needs decoupled weight decay (or weight_decay=0)"
        return "spam", None
    if comps - {"moret"} <= STABLE_COMPONENTS and opt.adam_form == "torch":
        if moret and cfg.moret_mode not in ("stable_spam", "clean"):
            return None, f"the fused Stable-SPAM step needs moret_mode 'stable_spam' or 'clean', not {cfg.moret_mode!r}"
        if cfg.warmup_steps:
            return None, "the fused Stable-SPAM step has no post-reset warmup (warmup_steps must be 0)"
        if not opt.decoupled_weight_decay and any(g["weight_decay"] != 0 for g in opt.param_groups):
            return None, "the fused Stable-SPAM step needs decoupled weight decay (or weight_decay=0)"
        if any(g.get("density", 1.0) < 1.0 for g in opt.param_groups):
            return None, "the fused Stable-SPAM step has no sparse momentum (density must be 1)"
        return "stable_spam", None
    names = "+".join(sorted(comps)) or "none"
    return None, (f"no fused step for components {names} with adam_form={opt.adam_form!r} (fused steps: "
                  "moret+spikeclip with adam_form='spam', any of moret, adaclip, adagn with adam_form='torch')")


def torch_adam_fused(groups: list[dict[str, Any]]) -> bool:
    """Whether the registry's ``adam``/``adamw`` take torch's fused kernel: with `AUTO_SELECT`, when every parameter
    is a floating-point CUDA tensor (the fused kernel's requirement), so that they are timed against the fused steps
    here on equal terms."""
    params = [p for g in groups for p in g["params"]]
    return AUTO_SELECT and bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def kernel_name(opt: torch.optim.Optimizer) -> str:
    """Which kernel `opt.step()` runs, for the trial's records: "triton" or "foreach" for the in-house Adam family,
    "torch-fused", "torch-foreach" or "torch-for-loop" for torch's Adam/AdamW, "package" otherwise."""
    status = getattr(opt, "fused_status", None)
    if status is not None:
        return "triton" if status()[0] else "foreach"
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        group = opt.param_groups[0]
        if group.get("fused"):
            return "torch-fused"
        cuda = all(p.is_cuda for p in group["params"])
        return "torch-foreach" if group.get("foreach") or (group.get("foreach") is None and cuda) else "torch-for-loop"
    return "package"


# --- kernels ---------------------------------------------------------------------------------------------------------


def _get_kernels() -> Any:
    global _kernels
    if _kernels is None:
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        from . import _triton_kernels

        _kernels = _triton_kernels
    return _kernels


@dataclass
class _Plan:
    """Device tables of one sub-bucket: blocks (tensor index, first entry, length), state pointers, scratch; for the
    gradient reductions (Stable-SPAM) the coarse table (rows of REDUCE_BLOCKS blocks) and a flag per row."""

    key: tuple[Any, ...]
    n_tensors: int
    n_blocks: int
    blocks: Tensor
    states: Tensor
    scratch: Tensor
    n_rows: int = 0
    rows: Tensor | None = None
    flags: Tensor | None = None
    grad_key: tuple[int, ...] = ()
    grads: Tensor | None = None


def _upload(values: list[int], device: torch.device) -> Tensor:
    """An int64 tensor on `device` without syncing the host (pinned host memory, asynchronous copy)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _block_table(numels: list[int], block: int = BLOCK) -> list[int]:
    rows: list[int] = []
    for t, n in enumerate(numels):
        for start in range(0, n, block):
            rows += (t, start, n)
    return rows


def _plan(opt: SpikeAwareAdam, b: Bucket, stats: tuple[str, ...]) -> _Plan:
    """The cached tables of bucket `b` (rebuilt when a tensor or a state tensor changes), gradient pointers current."""
    device = b.params[0].device
    states = [p.data_ptr() for p in b.params]
    for key in ("exp_avg", "exp_avg_sq", *stats):  # a statistic the configuration lacks: 0 (never read)
        states += [s[key].data_ptr() if key in s else 0 for s in b.states]
    numels = [p.numel() for p in b.params]
    key = (b.dtype, b.params[0].dtype, tuple(numels), tuple(states))
    plans: dict[tuple[Any, ...], _Plan] = opt.__dict__.setdefault("_fused_plans", {})
    slot = (id(b.group), b.params[0].dtype, states[0])
    plan = plans.get(slot)
    if plan is None or plan.key != key:
        rows = _block_table(numels)
        n = len(numels)
        plan = plans[slot] = _Plan(key=key, n_tensors=n, n_blocks=len(rows) // 3, blocks=_upload(rows, device),
                                   states=_upload(states, device),
                                   scratch=torch.empty(SCRATCH_ROWS * n, dtype=torch.float32, device=device))
        if stats:
            coarse = _block_table(numels, BLOCK * REDUCE_BLOCKS)
            plan.n_rows, plan.rows = len(coarse) // 3, _upload(coarse, device)
            plan.flags = torch.empty(plan.n_rows, dtype=torch.int32, device=device)
    grads = tuple(g.data_ptr() for g in b.grads)
    if grads != plan.grad_key:
        plan.grad_key, plan.grads = grads, _upload(list(grads), device)
    return plan


def _scalar_grid(n: int) -> tuple[int]:
    return ((n + SCALAR_BLOCK - 1) // SCALAR_BLOCK,)


# --- the step ---------------------------------------------------------------------------------------------------------


def _kernel_takes(p: Tensor, g: Tensor, state: dict[str, Any]) -> bool:
    """Dense contiguous tensors of one shape and dtype, 16-byte aligned (the kernels' vectorized accesses need it).
    Written out rather than a loop over the four tensors: it runs for every tensor at every step, on the host."""
    if "subset" in state or g.dtype != p.dtype or g.shape != p.shape:
        return False
    m, v = state["exp_avg"], state["exp_avg_sq"]
    return (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
            and (p.data_ptr() | g.data_ptr() | m.data_ptr() | v.data_ptr()) % ALIGN == 0)


def _split(b: Bucket) -> tuple[Bucket, Bucket]:
    fused = Bucket(group=b.group, dtype=b.dtype)
    rest = Bucket(group=b.group, dtype=b.dtype)
    for p, g, s in zip(b.params, b.grads, b.states, strict=True):
        target = fused if _kernel_takes(p, g, s) else rest
        target.params.append(p)
        target.grads.append(g)
        target.states.append(s)
    return fused, rest


def _hparams(opt: SpikeAwareAdam, group: dict[str, Any]) -> dict[str, Any]:
    """The group's hyperparameters. ``get``: `torch.optim.Optimizer.load_state_dict` adds keys (``differentiable``) to
    ``opt.defaults`` that the groups do not have."""
    return {key: group.get(key) for key in opt.defaults if key != "params"}


def _merged(opt: SpikeAwareAdam, buckets: list[Bucket]) -> list[Bucket]:
    """`buckets` with those of param groups whose hyperparameters (the keys of ``opt.defaults``) agree joined, per
    device and dtype, so that the launches do not grow with the number of groups either."""
    out: list[Bucket] = []
    for b in buckets:
        for m in out:
            p, q = m.params[0], b.params[0]
            if (m.dtype, p.dtype, p.device) == (b.dtype, q.dtype, q.device) and \
                    _hparams(opt, m.group) == _hparams(opt, b.group):
                m.params += b.params
                m.grads += b.grads
                m.states += b.states
                break
        else:
            out.append(b)
    return out


def _by_counters(b: Bucket, keys: tuple[str, ...]) -> list[tuple[tuple[int, ...], Bucket]]:
    """`b` split by the values of the per-tensor counters `keys` (one part when all tensors are in step)."""
    first = tuple(int(b.states[0][k]) for k in keys)
    if all(s[k] == c for s in b.states for k, c in zip(keys, first, strict=True)):  # the usual case, checked cheaply
        return [(first, b)]
    parts: dict[tuple[int, ...], Bucket] = {}
    for p, g, s in zip(b.params, b.grads, b.states, strict=True):
        counters = tuple(int(s[k]) for k in keys)
        part = parts.get(counters)
        if part is None:
            part = parts[counters] = Bucket(group=b.group, dtype=b.dtype)
        part.params.append(p)
        part.grads.append(g)
        part.states.append(s)
    return list(parts.items())


@dataclass
class _Partition:
    """A step's buckets, fused (merged across groups) and foreach, kept for the next step while its key holds. The
    buckets keep parameters and states, not gradients: those are read afresh at every step."""

    state: Any  # the optimizer's state mapping it was built from (held, so that its identity cannot be reused)
    key: tuple[Any, ...]
    fused: list[Bucket]
    rest: list[Bucket]


def _partition_key(opt: SpikeAwareAdam) -> tuple[Any, ...]:
    """What the partition depends on and a step can change: which tensors have a gradient and where it lies, the
    state (replaced by `load_state_dict`, grown by a first step) and the groups' hyperparameters (merging reads them).
    Layout, alignment and dtype of a gradient at the same address do not change between steps."""
    grads = tuple((id(p), 0 if p.grad is None else p.grad.data_ptr()) for g in opt.param_groups for p in g["params"])
    return len(opt.state), grads, [_hparams(opt, g) for g in opt.param_groups]


def _partition(opt: SpikeAwareAdam, ctx: StepContext, forced: bool) -> _Partition:
    key = _partition_key(opt)
    cached: _Partition | None = opt.__dict__.get("_fused_partition")
    if cached is not None and cached.state is opt.state and cached.key == key:
        for b in (*cached.fused, *cached.rest):
            b.grads = [p.grad for p in b.params]
        return cached
    rest: list[Bucket] = []
    fused: list[Bucket] = []
    for b in opt._buckets(ctx):
        why = unsupported_params(b.params[:1], forced)
        if why is not None:
            if forced:
                raise RuntimeError(f"fused=True, but the fused step does not apply to {why}")
            rest.append(b)
            continue
        taken, other = _split(b)
        if taken.params:
            fused.append(taken)
        if other.params:
            rest.append(other)
    part = opt.__dict__["_fused_partition"] = _Partition(opt.state, key, _merged(opt, fused), rest)
    return part


def fused_step(opt: SpikeAwareAdam, ctx: StepContext, kind: str, forced: bool) -> None:
    """One step of `opt` (whose configuration has the fused step `kind`): fused where it can, foreach elsewhere."""
    part = _partition(opt, ctx, forced)
    try:
        for b in part.fused:
            (_spam_bucket if kind == "spam" else _stable_bucket)(opt, b, ctx)
        if not part.rest:
            return
        copy = bool(opt.pipeline.transforms)
        for b in part.rest:
            cast = b.dtype != b.params[0].dtype
            b.work = F.copy_tensors(b.grads, b.dtype) if copy or cast else list(b.grads)
        opt._transform(part.rest, ctx)
        for b in part.rest:
            opt._update(b, ctx)
    finally:  # the kept buckets must not hold this step's gradients alive (set_to_none frees them)
        for b in (*part.fused, *part.rest):
            b.grads, b.work = [], []


def _dtypes(k: Any, b: Bucket) -> dict[str, Any]:
    """The kernels' element types (P parameter and gradient, S state) and whether they round like bfloat16 foreach."""
    return {"P": k.TL_DTYPES[b.params[0].dtype], "S": k.TL_DTYPES[b.dtype], "ROUND": b.dtype == torch.bfloat16}


def _added(x: float, b: Bucket) -> float:
    """A scalar that a foreach op adds (``add``'s alpha, an added constant) as torch's kernel for `b` uses it: CPU
    kernels round it to a 16-bit tensor's dtype first, CUDA kernels keep it in float32."""
    if b.params[0].device.type == "cpu" and b.dtype == torch.bfloat16:
        return float(torch.tensor(x, dtype=b.dtype))
    return x


def _spam_bucket(opt: SpikeAwareAdam, b: Bucket, ctx: StepContext) -> None:
    k = _get_kernels()
    cfg = opt.pipeline
    group = b.group
    lr = float(group["lr"])
    beta1, beta2 = group["betas"]
    beta1 = beta1 * ctx.schedule
    wd = float(group["weight_decay"])
    reset = ctx.reset and cfg.has("moret")
    clip = cfg.has("spikeclip") and ctx.spike_clip_active
    threshold = float(group["threshold"]) if cfg.has("spikeclip") else 0.0
    decay = 1.0 - lr * wd if wd != 0 else 1.0
    for state in b.states:
        state["step"] += 1
    for (t,), part in _by_counters(b, ("step",)):
        plan = _plan(opt, part, ())
        step_size = -(ctx.warmup * lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
        k.spam_kernel[(plan.n_blocks,)](plan.states, plan.grads, plan.blocks, plan.n_tensors, 1.0 - beta1, beta2,
                                        1.0 - beta2, _added(float(group["eps"]), part), step_size, decay, threshold,
                                        CLIP=clip, ZERO=reset, BLOCK=BLOCK, num_warps=NUM_WARPS, **_dtypes(k, part))


STATS: tuple[str, ...] = ("clip_threshold", "gn_mean", "gn_sq_mean")  # rows 3, 4, 5 of the state table


def _stable_bucket(opt: SpikeAwareAdam, b: Bucket, ctx: StepContext) -> None:
    cfg = opt.pipeline
    reset = ctx.reset and cfg.has("moret")
    stats = cfg.has("adaclip") or cfg.has("adagn")
    # Counters as `ComponentOptimizer._transform` and `SpikeAwareAdam._update` move them.
    for state in b.states:
        if stats:
            state["stat_step"] += 1
        state["step"] = 1 if reset else state["step"] + 1
    for counters, part in _by_counters(b, ("stat_step", "step") if stats else ("step",)):
        _stable_part(opt, part, ctx, counters[0], counters[-1], reset)
    if stats and reset and cfg.moret_mode == "stable_spam":
        for state in b.states:
            state["stat_step"] = 1


def _stable_part(opt: SpikeAwareAdam, b: Bucket, ctx: StepContext, c: int, t: int, reset: bool) -> None:
    """Up to five launches for all tensors of `b` (statistics counter c, Adam counter t): one read of the gradient for
    max |g| and its sum of squares (with adaclip or adagn); AdaClip's thresholds (adaclip); with both, the squares of
    the clipped entries that the first read could not settle (|g| above a floor of T_hat: few rows in a step without
    a spike); AdaGN's moments and factors (adagn); the update."""
    k = _get_kernels()
    cfg = opt.pipeline
    group = b.group
    plan = _plan(opt, b, STATS)
    n = plan.n_tensors
    types = _dtypes(k, b)
    grid = (plan.n_blocks,)
    flags = {"ADACLIP": cfg.has("adaclip"), "ADAGN": cfg.has("adagn")}
    split = flags["ADACLIP"] and flags["ADAGN"]
    eps = float(group["eps"])
    gamma3 = group["gamma3"] if flags["ADACLIP"] else 0.0
    bc3 = 1.0 - gamma3**c
    if flags["ADACLIP"] or flags["ADAGN"]:
        plan.scratch[: 2 * n].zero_()
        k.stats_kernel[(plan.n_rows,)](plan.grads, plan.rows, n, plan.states, plan.scratch,
                                       plan.scratch.view(torch.int32), plan.flags, gamma3, bc3, G=types["P"],
                                       S=types["S"], ROUND=types["ROUND"], MAX=flags["ADACLIP"], SQ=flags["ADAGN"],
                                       SPLIT=split, BLOCK=BLOCK, R=REDUCE_BLOCKS, num_warps=NUM_WARPS)
    if flags["ADACLIP"]:
        k.adaclip_kernel[_scalar_grid(n)](plan.states, n, plan.scratch, gamma3, _added(1.0 - gamma3, b), bc3,
                                          S=types["S"], ROUND=types["ROUND"], SBLOCK=SCALAR_BLOCK)
    if split:
        k.clipped_rest_kernel[(plan.n_rows,)](plan.grads, plan.rows, n, plan.scratch, plan.flags, G=types["P"],
                                              ROUND=types["ROUND"], BLOCK=BLOCK, R=REDUCE_BLOCKS, num_warps=NUM_WARPS)
    if flags["ADAGN"]:
        gamma1 = group["gamma1"] * ctx.schedule
        gamma2 = group["gamma2"]
        k.adagn_kernel[_scalar_grid(n)](plan.states, n, plan.scratch, gamma1, _added(1.0 - gamma1, b), gamma2,
                                        _added(1.0 - gamma2, b), 1.0 - gamma1**c, 1.0 - gamma2**c, _added(eps, b),
                                        S=types["S"], ROUND=types["ROUND"], SBLOCK=SCALAR_BLOCK)
    # Adam (torch form) with decoupled weight decay before the update; moret as `SpikeAwareAdam._update` does it.
    lr = float(group["lr"])
    beta1, beta2 = group["betas"]
    beta1 = beta1 * ctx.schedule
    wd = float(group["weight_decay"])
    decay = 1.0 - lr * wd if wd != 0 else 1.0
    bc1 = 1.0 - beta1**t
    step_size = (lr / bc1) * -1 if ctx.warmup == 1.0 else -(ctx.warmup * lr / bc1)
    k.stable_kernel[grid](plan.states, plan.grads, plan.blocks, n, plan.scratch, decay, 1.0 - beta1, beta2,
                          1.0 - beta2, step_size, (1.0 - beta2**t) ** 0.5, _added(eps, b),
                          ZERO_BEFORE=reset and cfg.moret_mode == "clean",
                          ZERO_AFTER=reset and cfg.moret_mode == "stable_spam", BLOCK=BLOCK, num_warps=NUM_WARPS,
                          **flags, **types)


# --- checking the fused path against the foreach path -----------------------------------------------------------------

CHECK_SHAPES: tuple[tuple[int, ...], ...] = ((67, 45), (300,), (3, 5, 7), (2049,), (16, 16))


# Unit roundoffs (u) one step may move each compared quantity by, where the paths round differently (`step_tolerance`).
STEP_ROUNDINGS: dict[str, int] = {"param": 1, "exp_avg": 5, "exp_avg_sq": 9}


def step_tolerance(dtype: torch.dtype, key: str) -> float:
    """How far one step of the two paths may take `key` apart from the same state, relative (see `compare_paths`).

    Both paths round at the same points (for bfloat16 state, after every operation where the foreach path rounds), so
    they part only where intermediates computed another way (a norm summed in another order, a contracted
    multiply-add, a CPU kernel that rounds a product before adding it) fall on different sides of a rounding boundary.
    An entry's own rounding then moves it by one unit roundoff u (2^-8 for bfloat16); a per-tensor scalar moves the
    whole tensor: the gradient's scale passes through four rounded quantities (the norm, AdaGN's bias-corrected mean,
    its denominator, the factor), so it can move by 4u. Bound: u for the parameters (whose update is far below their
    own rounding), 4u + u for the first moment, 2 * 4u + u for the second (which squares the scale); and no less than
    1e-6 for float32, whose tensors pass through a dozen operations in each path.
    """
    u = torch.finfo(dtype).eps / 2
    return max(STEP_ROUNDINGS[key] * u, 1e-6)


def compare_paths(
    build: Callable[..., torch.optim.Optimizer],
    name: str,
    hparams: dict[str, Any],
    device: torch.device | str,
    dtype: torch.dtype,
    steps: int = 60,
    shapes: tuple[tuple[int, ...], ...] = CHECK_SHAPES,
    seed: int = 0,
) -> dict[str, float]:
    """Run `name` fused and foreach on the same random gradients (with injected spikes), each step from the same state.

    Before every step the fused run takes the foreach run's parameters and state, so the errors are those of one step
    (`step_tolerance` bounds them) and do not compound: two bfloat16 trajectories whose per-tensor scalars once differ
    by a unit in the last place stay apart by about that much for good, which says nothing about the kernels. Returns
    the max over steps of ||x_fused - x_foreach|| / ||x_foreach|| over all tensors together, for the parameters
    (``param``) and the moments (``exp_avg``, ``exp_avg_sq``). Also checks that ``p.grad`` is left untouched by the
    fused step (``grad_changed`` is 1.0 if it was not).
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = []
    for k in range(steps):
        gs = [torch.randn(s, generator=gen) * (1.0 + 0.5 * i) for i, s in enumerate(shapes)]
        if k % 7 == 3:
            gs[0].view(-1)[5] *= 1000.0
            gs[-1].view(-1)[-1] *= -300.0
        grads.append([g.to(device=device, dtype=dtype) for g in gs])
    runs = []
    for fused in (True, False):
        params = [x.to(device=device, dtype=dtype, copy=True).requires_grad_(True) for x in init]
        opt = build(name, params, fused=fused, **hparams)
        runs.append((params, opt))
    (fused_params, fused_opt), (ref_params, ref_opt) = runs
    worst = dict.fromkeys(("param", "exp_avg", "exp_avg_sq"), 0.0)
    grad_changed = 0.0
    for k, gs in enumerate(grads):
        if k:
            fused_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
            with torch.no_grad():
                torch._foreach_copy_(fused_params, ref_params)
        for params, opt in runs:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
            if any(not torch.equal(p.grad, g) for p, g in zip(params, gs, strict=True)):
                grad_changed = 1.0
        worst["param"] = max(worst["param"], _rel([p.detach() for p in fused_params], [p.detach() for p in ref_params]))
        for key in ("exp_avg", "exp_avg_sq"):
            a = [fused_opt.state[p][key] for p in fused_params]
            b = [ref_opt.state[p][key] for p in ref_params]
            worst[key] = max(worst[key], _rel(a, b))
    return {**worst, "grad_changed": grad_changed}


def _rel(a: list[Tensor], b: list[Tensor]) -> float:
    num = sum(float(torch.sum((x.double() - y.double()) ** 2)) for x, y in zip(a, b, strict=True))
    den = sum(float(torch.sum(y.double() ** 2)) for y in b)
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)
