"""The tensor math of every update rule in this package, as pure multi-tensor (foreach) functions.

Each function takes lists of tensors that share one device and one dtype (one "bucket") and changes the tensors it
names with a trailing underscore in place. Nothing here reads a tensor's value on the host: per-tensor scalars that
depend only on step counters (bias corrections, step sizes) arrive as Python floats computed from host-side counters,
and per-tensor statistics that depend on data (max |g|, ||g||, the AdaClip threshold, the AdaGN moments) stay on the
device as 0-d tensors. So no function syncs the host with the device, and none loops over elements in Python.

This module is the single statement of the math: the optimizers in `spike_aware.py` and `compose.py` call it, and a
fused kernel can be checked against it.

Notation (DESIGN.md, "Algorithms"): g gradient of one tensor, m and v the Adam moments, c a per-tensor step counter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "adaclip_",
    "adagn_",
    "adam_moments_",
    "adam_step_corrected_eps_",
    "adam_step_raw_eps_",
    "clip_by_global_norm_",
    "copy_tensors",
    "ema_sq_",
    "global_norm",
    "spam_warmup_factor",
    "spike_clip_",
    "stable_spam_schedule",
]


def spam_warmup_factor(steps_since_reset: int, warmup_steps: int) -> float:
    """SPAM's post-reset warmup s(j) = 1 - 0.495 * (1 + cos(pi * j / (N + 1))) for j < N, and 1 afterwards.

    j counts steps since the last momentum reset (the reset step is j = 0, where s = 0.01); N = `warmup_steps`.
    """
    if steps_since_reset >= warmup_steps:
        return 1.0
    return 1.0 - 0.495 * (1.0 + math.cos(math.pi * steps_since_reset / (warmup_steps + 1)))


def stable_spam_schedule(step: int, total_steps: int | None, eta_min: float) -> float:
    """Stable-SPAM's factor a_k on beta1 and gamma1: 1 without `total_steps`, else a cosine from 1 towards eta_min.

    a_k = eta_min + (1 - eta_min) * (1 + cos(pi * k / (total_steps + 1))) / 2, not clamped past `total_steps`.
    """
    if total_steps is None:
        return 1.0
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * step / (total_steps + 1))) / 2.0


def copy_tensors(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """Fresh copies of `tensors` (cast to `dtype` if given), so that later in-place math leaves the originals alone."""
    if not tensors:
        return []
    if dtype is None or all(t.dtype == dtype for t in tensors):
        return list(torch._foreach_mul(list(tensors), 1.0))
    return [t.to(dtype=dtype, copy=True) for t in tensors]


def global_norm(buckets: Sequence[Sequence[Tensor]]) -> Tensor | None:
    """The 2-norm over every tensor of every bucket, as a 0-d tensor on the first tensor's device (None if empty)."""
    norms: list[Tensor] = []
    for tensors in buckets:
        if tensors:
            norms.extend(torch._foreach_norm(list(tensors), 2.0))
    if not norms:
        return None
    first = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), 2.0)


def clip_by_global_norm_(buckets: Sequence[Sequence[Tensor]], max_norm: float) -> Tensor | None:
    """Global-norm clipping, the same arithmetic as `torch.nn.utils.clip_grad_norm_` (returns the norm before).

    Every tensor is multiplied by min(1, max_norm / (total_norm + 1e-6)), computed on the device.
    """
    total = global_norm(buckets)
    if total is None:
        return None
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for tensors in buckets:
        if tensors:
            torch._foreach_mul_(list(tensors), coef.to(tensors[0].device))
    return total


def _positive_or_one(values: list[Tensor]) -> list[Tensor]:
    """x where x > 0, and 1 where x == 0 (x >= 0), exactly: max(x, 1 - sign(x))."""
    fallback = torch._foreach_sign(values)
    torch._foreach_neg_(fallback)
    torch._foreach_add_(fallback, 1.0)
    return torch._foreach_maximum(values, fallback)


def adaclip_(grads: list[Tensor], thresholds: list[Tensor], gamma3: float, bias_corrections: Sequence[float]) -> None:
    """Stable-SPAM's adaptive spike clipping, per tensor (thresholds: 0-d tensors T, updated in place).

    M = max|g|; T <- gamma3 * T + (1 - gamma3) * M; T_hat = T / (1 - gamma3^c) (given as `bias_corrections`);
    entries with |g| > T_hat are multiplied by T_hat / M, the others are left as they are.
    """
    if not grads:
        return
    abs_g = torch._foreach_abs(grads)
    peak = torch._foreach_norm(grads, math.inf)
    torch._foreach_mul_(thresholds, gamma3)
    torch._foreach_add_(thresholds, peak, alpha=1.0 - gamma3)
    t_hat = torch._foreach_div(thresholds, list(bias_corrections))
    # ratio = T_hat / M where some entry exceeds T_hat (then M > T_hat >= 0); finite everywhere else.
    ratio = torch._foreach_minimum(t_hat, peak)
    torch._foreach_div_(ratio, _positive_or_one(peak))
    # mask = 1 where |g| > T_hat, else 0.
    torch._foreach_sub_(abs_g, t_hat)
    torch._foreach_sign_(abs_g)
    torch._foreach_clamp_min_(abs_g, 0.0)
    scaled = torch._foreach_mul(grads, ratio)
    # lerp with weight exactly 0 or 1 returns the start or the end exactly.
    torch._foreach_lerp_(grads, scaled, abs_g)


def adagn_(
    grads: list[Tensor],
    norm_means: list[Tensor],
    norm_sq_means: list[Tensor],
    gamma1: float,
    gamma2: float,
    bias_corrections1: Sequence[float],
    bias_corrections2: Sequence[float],
    eps: float,
) -> None:
    """Stable-SPAM's adaptive gradient-norm scaling, per tensor (norm_means mu, norm_sq_means nu: 0-d, in place).

    n = ||g||_2; mu <- gamma1 * mu + (1 - gamma1) * n; nu <- gamma2 * nu + (1 - gamma2) * n^2;
    mu_hat = mu / (1 - gamma1^c), nu_hat = nu / (1 - gamma2^c) (given as bias corrections);
    if n > 0: g <- g / n * mu_hat / (sqrt(nu_hat) + eps)   (a zero gradient stays zero).
    """
    if not grads:
        return
    norms = torch._foreach_norm(grads, 2.0)
    torch._foreach_mul_(norm_means, gamma1)
    torch._foreach_add_(norm_means, norms, alpha=1.0 - gamma1)
    squares = torch._foreach_mul(norms, norms)
    torch._foreach_mul_(norm_sq_means, gamma2)
    torch._foreach_add_(norm_sq_means, squares, alpha=1.0 - gamma2)
    mu_hat = torch._foreach_div(norm_means, list(bias_corrections1))
    denom = torch._foreach_div(norm_sq_means, list(bias_corrections2))
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    factor = torch._foreach_div(mu_hat, denom)
    torch._foreach_div_(factor, _positive_or_one(norms))
    torch._foreach_mul_(grads, factor)


def spike_clip_(grads: list[Tensor], exp_avg_sqs: list[Tensor], threshold: float) -> None:
    """SPAM's spike-aware clipping: entries with g^2 > threshold * v become sign(g) * sqrt(threshold * v).

    v is the second moment as it stands before this step's update, not bias-corrected. The rule is a clamp of g to
    [-sqrt(threshold * v), sqrt(threshold * v)].
    """
    if not grads:
        return
    bound = torch._foreach_mul(exp_avg_sqs, threshold)
    torch._foreach_sqrt_(bound)
    torch._foreach_minimum_(grads, bound)
    torch._foreach_neg_(bound)
    torch._foreach_maximum_(grads, bound)


def ema_sq_(exp_avg_sqs: list[Tensor], grads: list[Tensor], beta2: float) -> None:
    """v <- beta2 * v + (1 - beta2) * g^2."""
    if not grads:
        return
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


def adam_moments_(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor], beta1: float,
                  beta2: float) -> None:
    """m <- beta1 * m + (1 - beta1) * g (as a lerp, like torch's Adam); v <- beta2 * v + (1 - beta2) * g^2."""
    if not grads:
        return
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    ema_sq_(exp_avg_sqs, grads, beta2)


def adam_step_corrected_eps_(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                             step_sizes: Sequence[float], bias_correction2_sqrts: Sequence[float], eps: float) -> None:
    """p <- p + step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), step_size = -lr / (1 - beta1^t) (times a factor).

    eps is added to the bias-corrected root, as in torch.optim.Adam/AdamW and Stable-SPAM; the arithmetic follows
    torch's multi-tensor Adam operation by operation.
    """
    if not params:
        return
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, list(bias_correction2_sqrts))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, list(step_sizes))


def adam_step_raw_eps_(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                       step_sizes: Sequence[float], eps: float) -> None:
    """p <- p + step_size * m / (sqrt(v) + eps), step_size = -lr * sqrt(1 - beta2^t) / (1 - beta1^t) (times a factor).

    eps is added to the raw root of v, as in SPAM (and the transformers/GaLore AdamW it is built on).
    """
    if not params:
        return
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, list(step_sizes))
