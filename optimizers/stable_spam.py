"""Stable-SPAM (arXiv 2502.17055), as DESIGN.md specifies it: the reference implementation's behaviour by default.

k = 1, 2, ... counts `step()` calls; each tensor has a counter c (starts at 0).

- a_k = 1 without ``total_steps``, else eta_min + (1 - eta_min) * (1 + cos(pi * k / (total_steps + 1))) / 2 (not
  clamped past total_steps); beta1' = beta1 * a_k, gamma1' = gamma1 * a_k.
- Per tensor, in order: p <- p * (1 - lr * wd); c <- c + 1;
  1. AdaClip: M = max|g|; T <- gamma3 T + (1 - gamma3) M; T_hat = T / (1 - gamma3^c); entries with |g| > T_hat are
     multiplied by T_hat / M.
  2. AdaGN: n = ||g||; mu <- gamma1' mu + (1 - gamma1') n; nu <- gamma2 nu + (1 - gamma2) n^2;
     mu_hat = mu / (1 - gamma1'^c); nu_hat = nu / (1 - gamma2^c); if n > 0: g <- g / n * mu_hat / (sqrt(nu_hat) + eps).
  3. MoRet: if k mod reset_interval = 0, c <- 1 and fresh zero m, v are installed for the next step; this step still
     updates and uses the old m, v (with c = 1).
  4. Adam: m <- beta1' m + (1 - beta1') g; v <- beta2 v + (1 - beta2) g^2;
     p <- p - lr / (1 - beta1'^c) * m / (sqrt(v) / sqrt(1 - beta2^c) + eps).

The counter that MoRet resets also drives the bias corrections of T, mu and nu, whose averages are not reset, so
the clipping threshold is inflated right after each reset. ``variant="clean"`` changes exactly that: on the reset
step the fresh (zero) moments are used, with Adam's counter restarting at 1, and T, mu, nu keep a separate counter
that is never reset.

Stable-SPAM is `SpikeAwareAdam` with components moret + adaclip + adagn, ``adam_form="torch"`` and
``moret_mode="stable_spam"`` (``"clean"`` for the clean variant); the registry's ``adamw+moret+adagn+adaclip`` with
those settings is the same optimizer (and ``adam+moret+adagn+adaclip`` too when weight decay is 0).
"""

from __future__ import annotations

from typing import Any

from .specs import STABLE_SPAM_DEFAULTS
from .spike_aware import SpikeAwareAdam

__all__ = ["STABLE_SPAM_VARIANTS", "StableSPAM"]

STABLE_SPAM_VARIANTS: dict[str, str] = {"reference": "stable_spam", "clean": "clean"}


class StableSPAM(SpikeAwareAdam):
    """Stable-SPAM (see the module docstring). Keyword-only extras: ``variant`` ("reference", the published
    behaviour, or "clean"), ``state_dtype`` ("param" or "float32": state in float32 for 16-bit parameters) and
    ``fused`` (None: the Triton step of `fused` on CUDA when `fused.AUTO_SELECT` is on and triton is importable; True:
    require it; False: foreach)."""

    def __init__(
        self,
        params: Any,
        lr: float = STABLE_SPAM_DEFAULTS["lr"],
        betas: tuple[float, float] = STABLE_SPAM_DEFAULTS["betas"],
        eps: float = STABLE_SPAM_DEFAULTS["eps"],
        weight_decay: float = STABLE_SPAM_DEFAULTS["weight_decay"],
        gamma1: float = STABLE_SPAM_DEFAULTS["gamma1"],
        gamma2: float = STABLE_SPAM_DEFAULTS["gamma2"],
        gamma3: float = STABLE_SPAM_DEFAULTS["gamma3"],
        reset_interval: int = STABLE_SPAM_DEFAULTS["reset_interval"],
        total_steps: int | None = STABLE_SPAM_DEFAULTS["total_steps"],
        eta_min: float = STABLE_SPAM_DEFAULTS["eta_min"],
        *,
        variant: str = "reference",
        state_dtype: str = "param",
        fused: bool | None = None,
    ) -> None:
        if variant not in STABLE_SPAM_VARIANTS:
            raise ValueError(f"variant={variant!r} is not one of {', '.join(STABLE_SPAM_VARIANTS)}")
        self.variant = variant
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            components=("moret", "adaclip", "adagn"),
            decoupled_weight_decay=True,
            adam_form="torch",
            moret_mode=STABLE_SPAM_VARIANTS[variant],
            reset_interval=reset_interval,
            gamma1=gamma1,
            gamma2=gamma2,
            gamma3=gamma3,
            total_steps=total_steps,
            eta_min=eta_min,
            state_dtype=state_dtype,
            fused=fused,
        )
