"""SPAM: Spike-Aware Adam with Momentum Reset (arXiv 2501.06842), as DESIGN.md specifies it.

k = 1, 2, ... counts `step()` calls; t counts a tensor's updates.

1. Momentum reset: on every step with k mod reset_interval = 0, m and v are set to zero before they are updated;
   the bias-correction counter t keeps running.
2. Post-reset warmup: the update (not the weight decay) is multiplied by s(j) = 1 - 0.495 * (1 + cos(pi * j /
   (N + 1))) for j = 0 ... N - 1 and 1 afterwards (N = warmup_steps, j = k mod reset_interval, s = 0.01 on the reset
   step); no warmup before the first reset.
3. Spike-aware clipping, only on steps with k mod reset_interval >= 20: an entry with g^2 > threshold * v (v the
   second moment after the previous step, not bias-corrected) is replaced by sign(g) * sqrt(threshold * v).
4. Adam: m <- beta1 m + (1 - beta1) g, v <- beta2 v + (1 - beta2) g^2,
   p <- p - s * lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps); then p <- p - lr * wd * p.
5. Sparse momentum (density < 1, 2-D tensors only): moments for a random subset of entries, redrawn at every reset;
   the other entries get no Adam update in that period.

Faults of the public code that this implementation avoids: a warmup longer than the reset interval (the public
training script passes the LR warmup, e.g. 1000, as N; the update then never reaches full size) is rejected;
clipping changes the gradient that enters the moments; ``p.grad`` is never modified.

SPAM is `SpikeAwareAdam` with components moret + spikeclip, ``adam_form="spam"`` and ``moret_mode="spam"``; the
registry's ``adamw+moret+spikeclip`` with those settings is the same optimizer.
"""

from __future__ import annotations

from typing import Any

from .specs import SPAM_DEFAULTS
from .spike_aware import SpikeAwareAdam

__all__ = ["SPAM"]


class SPAM(SpikeAwareAdam):
    """SPAM (see the module docstring). Keyword-only extras: ``state_dtype`` ("param" or "float32": optimizer state
    in float32 for 16-bit parameters), ``seed`` (for the random subsets of sparse momentum) and ``fused`` (None: the
    Triton step of `fused` on CUDA when `fused.AUTO_SELECT` is on and triton is importable; True: require it; False:
    the foreach path)."""

    def __init__(
        self,
        params: Any,
        lr: float = SPAM_DEFAULTS["lr"],
        betas: tuple[float, float] = SPAM_DEFAULTS["betas"],
        eps: float = SPAM_DEFAULTS["eps"],
        weight_decay: float = SPAM_DEFAULTS["weight_decay"],
        reset_interval: int = SPAM_DEFAULTS["reset_interval"],
        warmup_steps: int = SPAM_DEFAULTS["warmup_steps"],
        threshold: float = SPAM_DEFAULTS["threshold"],
        density: float = SPAM_DEFAULTS["density"],
        *,
        state_dtype: str = "param",
        seed: int = 0,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            components=("moret", "spikeclip"),
            decoupled_weight_decay=True,
            adam_form="spam",
            moret_mode="spam",
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            threshold=threshold,
            density=density,
            state_dtype=state_dtype,
            fused=fused,
            seed=seed,
        )
