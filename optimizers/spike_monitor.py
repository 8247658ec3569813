"""Gradient spike monitor: per-layer-type Gradient Spike Score statistics, accumulated on the device.

Definition (the SPAM paper's, made exact). For entry i of a parameter at its t-th monitored gradient g_t,

    GSS(g_t,i) = |g_t,i| / ( (1 / (t - 1)) * sum_{s < t} |g_s,i| ),

the ratio of the magnitude to the mean magnitude over the parameter's PAST gradients (the current one excluded).
The first gradient has no history and no GSS. An entry whose past mean is exactly 0 (it never had a non-zero
gradient, e.g. an embedding row of a token not seen yet) has no GSS either and is never counted. A spike is an entry
with GSS > ``threshold`` (50 in the paper).

Use from any training loop: call ``update()`` after ``backward()`` (before the gradients are cleared) and
``summary()`` when you log; ``reset()`` starts a new window of counts and maxima (the history of mean magnitudes is
kept). ``update()`` only launches device work (multi-tensor ops, no host syncs); ``summary()`` syncs once.

Cost: state is one float32 running sum of |g| per entry (the model's size in float32) plus a per-parameter update
count; each update reads every gradient once to add |g| to the sum and, on measured updates, a few more
elementwise passes. ``every=n`` measures GSS on every n-th update only (the sum still takes every update, so the
mean stays exact).

Layer types, from parameter names (LLaMA-style names first): embedding (embed_tokens, embed, wte, wpe), head
(lm_head), norm (norm, layernorm, ln_*), attention (q_proj, k_proj, v_proj, o_proj, attn, attention), mlp
(gate_proj, up_proj, down_proj, mlp, feed_forward, ffn), other. Summary keys: ``spikes/<type>`` (count of spikes in
the window) and ``max_gss/<type>`` (largest GSS in the window, 0 when none was measured), for the types present,
and ``spikes/total``, ``max_gss/total``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LAYER_TYPES", "SpikeMonitor", "layer_type"]

LAYER_TYPES: tuple[str, ...] = ("embedding", "attention", "mlp", "norm", "head", "other")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "attn", "attention")
_MLP = ("gate_proj", "up_proj", "down_proj", "mlp", "feed_forward", "ffn")
_LN = re.compile(r"(^|[._])ln(_|\d|\.|$)")


def layer_type(name: str) -> str:
    """The layer type of a parameter, from its name."""
    n = name.lower()
    if "embed" in n or re.search(r"(^|\.)(wte|wpe)(\.|$)", n):
        return "embedding"
    if "lm_head" in n:
        return "head"
    if "norm" in n or _LN.search(n):
        return "norm"
    if any(k in n for k in _ATTENTION):
        return "attention"
    if any(k in n for k in _MLP):
        return "mlp"
    return "other"


class SpikeMonitor:
    """Counts gradient spikes (GSS > threshold) and tracks the largest GSS, per layer type, on the device."""

    def __init__(self, model: nn.Module, threshold: float = 50.0, every: int = 1) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold!r}")
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.threshold = float(threshold)
        self.every = int(every)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.types = [layer_type(n) for n in self.names]
        self._sums: list[Tensor | None] = [None] * len(self.params)
        self._counts = [0] * len(self.params)
        self._spikes: list[Tensor | None] = [None] * len(self.params)
        self._max: list[Tensor | None] = [None] * len(self.params)
        self._updates = 0

    def _ensure(self, i: int, p: Tensor) -> None:
        if self._sums[i] is None:
            self._sums[i] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            self._spikes[i] = torch.zeros((), dtype=torch.float64, device=p.device)
            self._max[i] = torch.zeros((), dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current gradients in: measure their GSS (on measured updates), then add |g| to the history."""
        measure = self._updates % self.every == 0
        self._updates += 1
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for i, p in enumerate(self.params):
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(f"SpikeMonitor does not support sparse gradients ({self.names[i]})")
                self._ensure(i, p)
                by_device[p.device].append(i)
        for indices in by_device.values():
            magnitudes = torch._foreach_abs([self.params[i].grad.detach() for i in indices])
            magnitudes = [m if m.dtype == torch.float32 else m.to(torch.float32) for m in magnitudes]
            sums = [self._sums[i] for i in indices]
            if measure:
                seen = [k for k, i in enumerate(indices) if self._counts[i] > 0]
                if seen:
                    self._measure([indices[k] for k in seen], [magnitudes[k] for k in seen])
            torch._foreach_add_(sums, magnitudes)
            for i in indices:
                self._counts[i] += 1

    def _measure(self, indices: list[int], magnitudes: list[Tensor]) -> None:
        sums = [self._sums[i] for i in indices]
        # GSS = |g| * n / S where S > 0; entries with S == 0 get numerator 0 and denominator 1, hence GSS 0.
        has_history = torch._foreach_sign(sums)
        numerators = torch._foreach_mul(magnitudes, has_history)
        torch._foreach_mul_(numerators, [float(self._counts[i]) for i in indices])
        no_history = torch._foreach_neg(has_history)
        torch._foreach_add_(no_history, 1.0)
        denominators = torch._foreach_maximum(sums, no_history)
        gss = torch._foreach_div(numerators, denominators)
        torch._foreach_maximum_([self._max[i] for i in indices], torch._foreach_norm(gss, math.inf))
        torch._foreach_sub_(gss, self.threshold)
        torch._foreach_sign_(gss)
        torch._foreach_clamp_min_(gss, 0.0)
        counts = torch._foreach_norm(gss, 1.0)
        torch._foreach_add_([self._spikes[i] for i in indices], [c.to(torch.float64) for c in counts])

    def reset(self, history: bool = False) -> None:
        """Start a new window of counts and maxima; with ``history=True`` forget the mean magnitudes too."""
        accumulators = [t for t in self._spikes + self._max if t is not None]
        if accumulators:
            torch._foreach_zero_(accumulators)
        if history:
            self._sums = [None] * len(self.params)
            self._spikes = [None] * len(self.params)
            self._max = [None] * len(self.params)
            self._counts = [0] * len(self.params)

    def summary(self, per_param: bool = False) -> dict[str, float]:
        """Counts and maxima of the current window, per layer type (and per parameter with ``per_param``)."""
        tracked = [i for i in range(len(self.params)) if self._spikes[i] is not None]
        values: list[float] = []
        if tracked:
            device = self._spikes[tracked[0]].device
            stacked = torch.stack(
                [self._spikes[i].to(device) for i in tracked]
                + [self._max[i].to(device, torch.float64) for i in tracked]
            )
            values = stacked.tolist()
        spikes = dict(zip(tracked, values[: len(tracked)], strict=True))
        maxima = dict(zip(tracked, values[len(tracked):], strict=True))
        out: dict[str, float] = {}
        present = [t for t in LAYER_TYPES if t in self.types]
        for t in present:
            members = [i for i in tracked if self.types[i] == t]
            out[f"spikes/{t}"] = float(sum(spikes[i] for i in members))
            out[f"max_gss/{t}"] = float(max((maxima[i] for i in members), default=0.0))
        out["spikes/total"] = float(sum(spikes.values()))
        out["max_gss/total"] = float(max(maxima.values(), default=0.0))
        if per_param:
            for i in tracked:
                out[f"spikes/param/{self.names[i]}"] = float(spikes[i])
                out[f"max_gss/param/{self.names[i]}"] = float(maxima[i])
        return out

    def state_dict(self) -> dict[str, Any]:
        """The history and the current window, for checkpoints."""
        return {
            "sums": list(self._sums),
            "counts": list(self._counts),
            "spikes": list(self._spikes),
            "max": list(self._max),
            "updates": self._updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["counts"]) != len(self.params):
            raise ValueError("the state belongs to a model with a different number of parameters")

        def moved(values: list[Tensor | None]) -> list[Tensor | None]:
            return [None if v is None else v.to(p.device, copy=True) for v, p in zip(values, self.params, strict=True)]

        self._sums = moved(state["sums"])
        self._spikes = moved(state["spikes"])
        self._max = moved(state["max"])
        self._counts = list(state["counts"])
        self._updates = int(state["updates"])
