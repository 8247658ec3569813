"""Fused GPU steps (Triton) for SPAM and Stable-SPAM, checked against the foreach path of `functional.py`.

Two update rules of `spike_aware.SpikeAwareAdam` have a fused step:

- ``spam``: components within {moret, spikeclip}, ``adam_form="spam"``, moret_mode "spam", decoupled weight decay
  (SPAM and the registry's ``adamw+moret+spikeclip`` with those settings). One kernel per tensor reads p, g, m, v
  and writes p, m, v: moments zeroed on the reset step, spike clip against v before the update (only when the step
  context says clipping is active), Adam in SPAM's form with the warmup factor, then p <- p * (1 - lr * wd).
- ``stable_spam``: components {adaclip, adagn} with optional moret (mode "stable_spam" or "clean"),
  ``adam_form="torch"`` (StableSPAM, ``adamw+moret+adagn+adaclip`` and ``adam+...`` without weight decay). Per
  bucket: max |g| per tensor (one multi-tensor launch), the AdaClip threshold update on device 0-d tensors, one
  reduction kernel per tensor for the norm of the clipped gradient, the AdaGN moment update on device, and one
  update kernel per tensor applying clip, AdaGN scale, decoupled weight decay and Adam (torch form).

Every scalar that depends only on counters (bias corrections, step sizes, warmup, schedule) is computed on the host
from the same counters as the foreach path and passed as a kernel argument; data-dependent scalars stay on the device
as 0-d tensors read by the kernels, so no step syncs the host with the device. Kernels read the gradient from
``p.grad`` (no copy, left untouched) and compute in float32 whatever the storage dtype. The state (keys, dtypes,
counters) is the foreach path's, so a state dict moves between the two paths.

Tensors the kernels do not take (sparse-momentum subsets, non-contiguous tensors) go through the foreach path in the
same step. The fused path is used when triton can be imported, the configuration is supported and the parameters
are CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1`` when ``fused=True`` is requested).

`AUTO_SELECT` is False for now: the kernels agree with the foreach path in Triton's interpreter, but their check and
timing on a CUDA device (``python -m optimizers.benchmark --check``) are not yet in results/perf. Until they are, the
fused step runs only when asked for with ``fused=True``; ``fused=None`` keeps the foreach path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
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
    "interpret_mode",
    "triton_unavailable_reason",
    "unsupported_params",
]

BLOCK = 2048
NUM_WARPS = 8
# Parameter dtypes the kernels take (others, e.g. float64, keep the foreach path: the kernels compute in float32).
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
SPAM_COMPONENTS = frozenset({"moret", "spikeclip"})
STABLE_COMPONENTS = frozenset({"adaclip", "adagn"})

_triton_reason: str | None = None
_triton_checked = False
AUTO_SELECT = False  # fused=None takes the fused step on CUDA only when True (see the module docstring)
_kernels: dict[str, Any] | None = None


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
    if comps - {"moret"} == STABLE_COMPONENTS and opt.adam_form == "torch":
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
                  "moret+spikeclip with adam_form='spam', adaclip+adagn(+moret) with adam_form='torch')")


# --- kernels ----------------------------------------------------------------------------------------------------------


def _get_kernels() -> dict[str, Any]:
    global _kernels
    if _kernels is None:
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        from . import _triton_kernels as k

        _kernels = {"spam": k.spam_kernel, "norm": k.clipped_sq_norm_kernel, "stable": k.stable_kernel}
    return _kernels


def _grid(n: int) -> tuple[int]:
    return (max(1, (n + BLOCK - 1) // BLOCK),)


# --- the step ---------------------------------------------------------------------------------------------------------


def _kernel_takes(p: Tensor, g: Tensor, state: dict[str, Any]) -> bool:
    return ("subset" not in state and g.dtype == p.dtype and g.shape == p.shape and p.is_contiguous()
            and g.is_contiguous() and state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous())


def _split(b: Bucket) -> tuple[Bucket, Bucket]:
    fused = Bucket(group=b.group, dtype=b.dtype)
    rest = Bucket(group=b.group, dtype=b.dtype)
    for p, g, s in zip(b.params, b.grads, b.states, strict=True):
        target = fused if _kernel_takes(p, g, s) else rest
        target.params.append(p)
        target.grads.append(g)
        target.states.append(s)
    return fused, rest


def fused_step(opt: SpikeAwareAdam, ctx: StepContext, kind: str, forced: bool) -> None:
    """One step of `opt` (whose configuration has the fused step `kind`): fused where it can, foreach elsewhere."""
    rest: list[Bucket] = []
    for b in opt._buckets(ctx):
        why = unsupported_params(b.params[:1], forced)
        if why is not None:
            if forced:
                raise RuntimeError(f"fused=True, but the fused step does not apply to {why}")
            rest.append(b)
            continue
        fused, other = _split(b)
        if fused.params:
            (_spam_bucket if kind == "spam" else _stable_bucket)(opt, fused, ctx)
        if other.params:
            rest.append(other)
    if not rest:
        return
    copy = bool(opt.pipeline.transforms)
    for b in rest:
        cast = b.dtype != b.params[0].dtype
        b.work = F.copy_tensors(b.grads, b.dtype) if copy or cast else list(b.grads)
    opt._transform(rest, ctx)
    for b in rest:
        opt._update(b, ctx)


def _spam_bucket(opt: SpikeAwareAdam, b: Bucket, ctx: StepContext) -> None:
    kernel = _get_kernels()["spam"]
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
    for p, g, state in zip(b.params, b.grads, b.states, strict=True):
        state["step"] += 1
        t = state["step"]
        step_size = -(ctx.warmup * lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
        n = p.numel()
        kernel[_grid(n)](p, g, state["exp_avg"], state["exp_avg_sq"], n, 1.0 - beta1, beta2, 1.0 - beta2,
                         float(group["eps"]), step_size, decay, threshold, CLIP=clip, ZERO=reset, BLOCK=BLOCK,
                         num_warps=NUM_WARPS)


def _stable_bucket(opt: SpikeAwareAdam, b: Bucket, ctx: StepContext) -> None:
    kernels = _get_kernels()
    cfg = opt.pipeline
    group = b.group
    dtype = b.dtype
    reset = ctx.reset and cfg.has("moret")
    device = b.params[0].device

    # AdaClip thresholds (device 0-d tensors), as `functional.adaclip_` computes them.
    for state in b.states:
        state["stat_step"] += 1
    counts = [state["stat_step"] for state in b.states]
    gamma3 = group["gamma3"]
    peak = torch._foreach_norm(b.grads, math.inf)
    if peak[0].dtype != dtype:
        peak = list(torch.stack(peak).to(dtype).unbind(0))
    thresholds = [s["clip_threshold"] for s in b.states]
    torch._foreach_mul_(thresholds, gamma3)
    torch._foreach_add_(thresholds, peak, alpha=1.0 - gamma3)
    t_hat = torch._foreach_div(thresholds, [1.0 - gamma3**c for c in counts])
    ratio = torch._foreach_minimum(t_hat, peak)
    torch._foreach_div_(ratio, F._positive_or_one(peak))

    # Norms of the clipped gradients, then AdaGN's moments and scale factors, as `functional.adagn_` computes them.
    sq = torch.zeros(len(b.params), dtype=torch.float32, device=device)
    for i, g in enumerate(b.grads):
        n = g.numel()
        kernels["norm"][_grid(n)](g, n, t_hat[i], ratio[i], sq[i], BLOCK=BLOCK, num_warps=NUM_WARPS)
    norms = list(torch.sqrt(sq).to(dtype).unbind(0))
    gamma1 = group["gamma1"] * ctx.schedule
    gamma2 = group["gamma2"]
    eps = float(group["eps"])
    means = [s["gn_mean"] for s in b.states]
    sq_means = [s["gn_sq_mean"] for s in b.states]
    torch._foreach_mul_(means, gamma1)
    torch._foreach_add_(means, norms, alpha=1.0 - gamma1)
    squares = torch._foreach_mul(norms, norms)
    torch._foreach_mul_(sq_means, gamma2)
    torch._foreach_add_(sq_means, squares, alpha=1.0 - gamma2)
    mu_hat = torch._foreach_div(means, [1.0 - gamma1**c for c in counts])
    denom = torch._foreach_div(sq_means, [1.0 - gamma2**c for c in counts])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    factor = torch._foreach_div(mu_hat, denom)
    torch._foreach_div_(factor, F._positive_or_one(norms))
    if reset and cfg.moret_mode == "stable_spam":
        for state in b.states:
            state["stat_step"] = 1

    # Adam (torch form) with decoupled weight decay before the update; moret as `SpikeAwareAdam._update` does it.
    lr = float(group["lr"])
    beta1, beta2 = group["betas"]
    beta1 = beta1 * ctx.schedule
    wd = float(group["weight_decay"])
    decay = 1.0 - lr * wd if wd != 0 else 1.0
    zero_first = reset and cfg.moret_mode == "clean"
    for state in b.states:
        state["step"] = 1 if reset else state["step"] + 1
    kernel = kernels["stable"]
    for i, (p, g, state) in enumerate(zip(b.params, b.grads, b.states, strict=True)):
        t = state["step"]
        bc1 = 1.0 - beta1**t
        step_size = (lr / bc1) * -1 if ctx.warmup == 1.0 else -(ctx.warmup * lr / bc1)
        n = p.numel()
        kernel[_grid(n)](p, g, state["exp_avg"], state["exp_avg_sq"], n, t_hat[i], ratio[i], factor[i], decay,
                         1.0 - beta1, beta2, 1.0 - beta2, step_size, (1.0 - beta2**t) ** 0.5, eps, ZERO=zero_first,
                         BLOCK=BLOCK, num_warps=NUM_WARPS)
    if reset and cfg.moret_mode == "stable_spam":
        torch._foreach_zero_([s["exp_avg"] for s in b.states] + [s["exp_avg_sq"] for s in b.states])


# --- checking the fused path against the foreach path -----------------------------------------------------------------

CHECK_SHAPES: tuple[tuple[int, ...], ...] = ((67, 45), (300,), (3, 5, 7), (2049,), (16, 16))


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
    """Run `name` fused and foreach on the same random gradients (with injected spikes); relative errors.

    Returns max over steps of ||p_fused - p_foreach|| / ||p_foreach|| (``param``) and, at the end, the same for the
    moments (``exp_avg``, ``exp_avg_sq``), over all tensors together. Also checks that ``p.grad`` is left untouched
    by the fused step (``grad_changed`` is 1.0 if it was not).
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
    worst = 0.0
    grad_changed = 0.0
    for gs in grads:
        for (params, opt) in runs:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
            if any(not torch.equal(p.grad, g) for p, g in zip(params, gs, strict=True)):
                grad_changed = 1.0
        worst = max(worst, _rel([p.detach() for p in runs[0][0]], [p.detach() for p in runs[1][0]]))
    out = {"param": worst, "grad_changed": grad_changed}
    for key in ("exp_avg", "exp_avg_sq"):
        a = [runs[0][1].state[p][key] for p in runs[0][0]]
        b = [runs[1][1].state[p][key] for p in runs[1][0]]
        out[key] = _rel(a, b)
    return out


def _rel(a: list[Tensor], b: list[Tensor]) -> float:
    num = sum(float(torch.sum((x.double() - y.double()) ** 2)) for x, y in zip(a, b, strict=True))
    den = sum(float(torch.sum(y.double() ** 2)) for y in b)
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)
