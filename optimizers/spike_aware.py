"""The in-house Adam that carries the spike-aware components: SPAM, Stable-SPAM and the adam/adamw compositions.

`SpikeAwareAdam` is Adam with any subset of the components of `compose.py` and two arithmetic forms:

- ``adam_form="torch"`` (torch.optim.Adam/AdamW and Stable-SPAM): p <- p - lr / (1 - beta1^t) * m /
  (sqrt(v) / sqrt(1 - beta2^t) + eps); decoupled weight decay p <- p * (1 - lr * wd) before the update.
- ``adam_form="spam"`` (SPAM): p <- p - s * lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps); decoupled
  weight decay p <- p - lr * wd * p after the update.

With ``decoupled_weight_decay=False`` weight decay is L2 instead, added to the (transformed) gradient as torch's Adam
does. s is the SPAM post-reset warmup factor (1 without it); with ``total_steps`` beta1 is scaled by Stable-SPAM's
cosine factor a_k (so is AdaGN's gamma1).

Sparse momentum (``density`` < 1; 2-D tensors only, in the groups whose ``density`` is below 1): Adam's moments are
kept for a random subset of int(density * numel) entries, redrawn at every momentum reset (and drawn on the first
update); the other entries get no Adam update in that period (weight decay still applies to every entry). Gradient
transforms that look at the whole tensor (gradclip, adaclip, adagn) see the whole gradient; spikeclip and Adam see
the subset. A subset is a sorted index tensor (int32 below 2^31 entries) drawn from a generator seeded by
(seed, reset number, parameter index), so a resumed run draws the same subsets. Sparse tensors must be contiguous.

Fused path (``fused``): None takes the Triton step of `fused` when `fused.AUTO_SELECT` is on, the configuration has
one (SPAM's and Stable-SPAM's), triton is importable and the parameters are CUDA tensors, and the foreach path
otherwise; True requires it (ValueError naming why not); False always takes the foreach path. Both paths keep the
same state.

State per parameter: ``step`` (int, Adam's bias-correction counter), ``exp_avg``, ``exp_avg_sq`` (compact when
sparse), ``subset`` (sparse only), and the component state of `compose.ComponentOptimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from . import fused as fused_steps
from .compose import Bucket, ComponentOptimizer, Pipeline, StepContext, component_group_defaults
from .specs import IN_HOUSE_ADAM, default

__all__ = ["ADAM_FORMS", "SpikeAwareAdam"]

ADAM_FORMS: tuple[str, ...] = ("torch", "spam")


def _subset_seed(seed: int, reset_id: int, param_index: int) -> int:
    return ((seed * 1_000_003 + reset_id) * 998_244_353 + param_index) % (2**63 - 1)


class SpikeAwareAdam(ComponentOptimizer):
    """Adam with spike-aware components (see the module docstring and `compose`)."""

    def __init__(
        self,
        params: Any,
        lr: float = IN_HOUSE_ADAM["lr"],
        betas: tuple[float, float] = IN_HOUSE_ADAM["betas"],
        eps: float = IN_HOUSE_ADAM["eps"],
        weight_decay: float = IN_HOUSE_ADAM["weight_decay"],
        *,
        components: Iterable[str] = (),
        decoupled_weight_decay: bool = True,
        adam_form: str = IN_HOUSE_ADAM["adam_form"],
        moret_mode: str = default("moret_mode"),
        reset_interval: int = default("reset_interval"),
        warmup_steps: int = default("warmup_steps"),
        threshold: float = default("threshold"),
        gamma1: float = default("gamma1"),
        gamma2: float = default("gamma2"),
        gamma3: float = default("gamma3"),
        max_norm: float = default("max_norm"),
        total_steps: int | None = default("total_steps"),
        eta_min: float = default("eta_min"),
        density: float | None = None,
        state_dtype: str = IN_HOUSE_ADAM["state_dtype"],
        seed: int = IN_HOUSE_ADAM["seed"],
        fused: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas!r} (each must lie in [0, 1))")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r}")
        if adam_form not in ADAM_FORMS:
            raise ValueError(f"adam_form={adam_form!r} is not one of {', '.join(ADAM_FORMS)}")
        if density is not None and not 0.0 < density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density!r}")
        pipeline = Pipeline(
            components=frozenset(components),
            moret_mode=moret_mode,
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            max_norm=max_norm,
            total_steps=total_steps,
            eta_min=eta_min,
            state_dtype=state_dtype,
        )
        defaults: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        if density is not None:
            defaults["density"] = density
        defaults.update(component_group_defaults(
            pipeline.components, {"threshold": threshold, "gamma1": gamma1, "gamma2": gamma2, "gamma3": gamma3}))
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.adam_form = adam_form
        self.seed = int(seed)
        self._param_index: dict[int, int] | None = None
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        super().__init__(params, defaults, pipeline)
        self._fused_kind, reason = fused_steps.config_kind(self)
        if fused is True:
            reason = reason or fused_steps.triton_unavailable_reason()
            if reason is None:
                reason = fused_steps.unsupported_params(self._all_params(), forced=True)
            if reason is not None:
                raise ValueError(f"fused=True is not possible: {reason}")

    # --- sparse subsets ---------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._param_index = None
        self._any_cuda: bool | None = None

    def _index_of(self, p: Tensor) -> int:
        if self._param_index is None:
            params = [q for group in self.param_groups for q in group["params"]]
            self._param_index = {id(q): i for i, q in enumerate(params)}
        return self._param_index[id(p)]

    def _reset_id(self, k: int) -> int:
        return k // self.pipeline.reset_interval if self.pipeline.has("moret") else 0

    def _draw_subset(self, p: Tensor, density: float, k: int) -> Tensor:
        n = p.numel()
        count = max(1, int(density * n))
        generator = torch.Generator(device=p.device)
        generator.manual_seed(_subset_seed(self.seed, self._reset_id(k), self._index_of(p)))
        index = torch.randperm(n, generator=generator, device=p.device)[:count]
        index = torch.sort(index).values
        return index.to(torch.int32) if n < 2**31 else index

    def _is_sparse(self, p: Tensor, group: dict[str, Any]) -> bool:
        density = group.get("density")
        return density is not None and density < 1.0 and p.dim() == 2

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype,
                    ctx: StepContext) -> None:
        super()._init_state(p, state, group, dtype, ctx)
        state["step"] = 0
        if self._is_sparse(p, group):
            if not p.is_contiguous():
                raise ValueError("sparse momentum (density < 1) needs contiguous parameters")
            subset = self._draw_subset(p, group["density"], ctx.k)
            state["subset"] = subset
            state["exp_avg"] = torch.zeros(subset.numel(), dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(subset.numel(), dtype=dtype, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _fresh_moments(self, b: Bucket, k: int) -> None:
        """Zero the moments of a bucket; sparse tensors get a new subset with zero moments."""
        dense = [s for s in b.states if "subset" not in s]
        if dense:
            torch._foreach_zero_([s["exp_avg"] for s in dense] + [s["exp_avg_sq"] for s in dense])
        for p, state in zip(b.params, b.states, strict=True):
            if "subset" in state:
                subset = self._draw_subset(p, b.group["density"], k)
                state["subset"] = subset
                state["exp_avg"] = torch.zeros(subset.numel(), dtype=b.dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(subset.numel(), dtype=b.dtype, device=p.device)

    # --- the fused path ---------------------------------------------------------------------------------------------

    def fused_status(self) -> tuple[bool, str | None]:
        """(whether `step()` takes the fused path for the current parameters, why not when it does not)."""
        if self.fused is False:
            return False, "disabled (fused=False)"
        if self._fused_kind is None:
            return False, fused_steps.config_kind(self)[1]
        params = self._all_params()
        reason = fused_steps.unsupported_params(params, self.fused is True) if params else "no parameters"
        if reason is None:
            reason = fused_steps.triton_unavailable_reason()
        if reason is None and self.fused is None and not fused_steps.AUTO_SELECT:
            reason = "automatic selection is off until the fused step is checked on a GPU; pass fused=True to use it"
        return reason is None, reason

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _use_fused(self) -> bool:
        if self.fused is False or self._fused_kind is None:
            return False
        if self.fused is True:
            return True
        if self._any_cuda is None:
            self._any_cuda = any(p.is_cuda for p in self._all_params())
        return fused_steps.AUTO_SELECT and self._any_cuda and fused_steps.triton_unavailable_reason() is None

    # --- the update -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ctx = self._begin_step()
        if self._use_fused():
            assert self._fused_kind is not None
            fused_steps.fused_step(self, ctx, self._fused_kind, forced=self.fused is True)
            return loss
        buckets = self._collect(ctx, copy=bool(self.pipeline.transforms))
        self._transform(buckets, ctx)
        for b in buckets:
            self._update(b, ctx)
        return loss

    def _update(self, b: Bucket, ctx: StepContext) -> None:
        cfg = self.pipeline
        group = b.group
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        beta1 = beta1 * ctx.schedule
        eps = group["eps"]
        wd = group["weight_decay"]
        reset = ctx.reset and cfg.has("moret")

        for state in b.states:
            state["step"] += 1
        if reset:
            if cfg.moret_mode == "stable_spam":
                for state in b.states:
                    state["step"] = 1
            else:
                self._fresh_moments(b, ctx.k)
                if cfg.moret_mode == "clean":
                    for state in b.states:
                        state["step"] = 1
        steps = [state["step"] for state in b.states]
        exp_avgs = [state["exp_avg"] for state in b.states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in b.states]

        cast = b.dtype != b.params[0].dtype
        p_work = [p.to(b.dtype) for p in b.params] if cast else b.params
        if wd != 0 and self.decoupled_weight_decay and self.adam_form == "torch":
            torch._foreach_mul_(p_work, 1.0 - lr * wd)

        sparse = [i for i, state in enumerate(b.states) if "subset" in state]
        grads = list(b.work)
        p_eff = list(p_work)
        for i in sparse:
            subset = b.states[i]["subset"]
            grads[i] = b.work[i].reshape(-1).index_select(0, subset)
            p_eff[i] = p_work[i].view(-1).index_select(0, subset)
        if wd != 0 and not self.decoupled_weight_decay:
            grads = list(torch._foreach_add(grads, p_eff, alpha=wd))
        if cfg.has("spikeclip") and ctx.spike_clip_active:
            F.spike_clip_(grads, exp_avg_sqs, group["threshold"])

        F.adam_moments_(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
        bias_corrections1 = [1.0 - beta1**t for t in steps]
        bias_corrections2 = [1.0 - beta2**t for t in steps]
        scale = ctx.warmup
        if self.adam_form == "torch":
            if scale == 1.0:
                step_sizes = [(lr / bc) * -1 for bc in bias_corrections1]
            else:
                step_sizes = [-(scale * lr / bc) for bc in bias_corrections1]
            F.adam_step_corrected_eps_(p_eff, exp_avgs, exp_avg_sqs, step_sizes,
                                       [bc**0.5 for bc in bias_corrections2], eps)
        else:
            step_sizes = [
                -(scale * lr * math.sqrt(bc2) / bc1)
                for bc1, bc2 in zip(bias_corrections1, bias_corrections2, strict=True)
            ]
            F.adam_step_raw_eps_(p_eff, exp_avgs, exp_avg_sqs, step_sizes, eps)

        for i in sparse:
            p_work[i].view(-1).index_put_((b.states[i]["subset"],), p_eff[i])
        if wd != 0 and self.decoupled_weight_decay and self.adam_form == "spam":
            torch._foreach_mul_(p_work, 1.0 - lr * wd)
        if cast:
            torch._foreach_copy_(b.params, p_work)
        if reset and cfg.moret_mode == "stable_spam":
            self._fresh_moments(b, ctx.k)
