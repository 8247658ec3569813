"""Training statistics of the LLaMA pre-training task for the papers' analyses: loss spikes, optimizer-state bytes,
and gradient spikes per layer.

Loss spike (the definition used throughout the harness). With L_t the mean token loss of optimizer step t (the
quantity the logged `loss` averages over `log_every` steps), step t is a loss spike when

    L_t > ratio * mean(L_{t-W}, ..., L_{t-1}),

the mean of the W = `window` preceding step losses; steps before W losses have been seen are never spikes. Defaults
ratio 1.5, W = 20. The counter also keeps the largest L_t / mean of a window (`max_loss_ratio`). It runs on the
device (a ring buffer of W scalars; no host sync per step).

Optimizer-state bytes: the bytes of every tensor reachable from `optimizer.state` (nested dicts, lists and plain
objects such as GaLore's projector included; a storage shared by two entries counted once), and from the state of an
optimizer it wraps (`.base`). Integer tensors (e.g. the index sets of SPAM's sparse momentum) are also counted
separately.

Per-layer gradient spikes: `SpikeMonitor.summary(per_param=True)` counts folded into layers — ``embedding``,
``layers.<i>.attention``, ``layers.<i>.mlp``, ``layers.<i>.norm``, ``norm`` (the final norm), ``head`` — and written
as CSV rows ``step,layer,spikes,max_gss`` (one row per layer and log window) for the heat maps of the leaderboard.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optimizers.spike_monitor import layer_type

LAYER_CSV = "spikes_per_layer.csv"
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class LossSpikeCounter:
    """Counts loss spikes (see the module docstring) on the device; `summary()` syncs once."""

    def __init__(self, ratio: float, window: int, device: torch.device | str) -> None:
        self.ratio, self.window = float(ratio), int(window)
        self.history = torch.zeros(self.window, dtype=torch.float32, device=device)
        self.seen = 0
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # spikes in the current log window
        self.total = torch.zeros((), dtype=torch.float64, device=device)  # spikes since the start of training
        self.max_ratio = torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def update(self, loss: Tensor) -> None:
        """Fold in the mean loss of one step (a 0-dim tensor on the counter's device)."""
        loss = loss.detach().to(torch.float32)
        if self.seen >= self.window:
            ratio = loss / self.history.mean()
            spike = (ratio > self.ratio).to(torch.float64)
            self.count += spike
            self.total += spike
            torch.maximum(self.max_ratio, torch.nan_to_num(ratio, nan=0.0), out=self.max_ratio)
        self.history[self.seen % self.window] = loss
        self.seen += 1

    def summary(self) -> dict[str, float]:
        """Spikes and the largest loss ratio of the current log window."""
        count, max_ratio = torch.stack([self.count, self.max_ratio.to(torch.float64)]).tolist()
        return {"loss_spikes": count, "max_loss_ratio": max_ratio}

    def reset(self) -> None:
        """Start a new log window (the history of losses and the total are kept)."""
        self.count.zero_()
        self.max_ratio.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.detach().cpu(), "seen": self.seen, "count": self.count.cpu(),
                "total": self.total.cpu(), "max_ratio": self.max_ratio.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.history.device
        self.history = state["history"].to(device)
        self.seen = int(state["seen"])
        self.count, self.total = state["count"].to(device), state["total"].to(device)
        self.max_ratio = state["max_ratio"].to(device)


def _tensor_bytes(obj: Any, seen: set[int], storages: set[tuple[torch.device, int]], depth: int = 0) -> tuple[int, int]:
    """(all bytes, integer-tensor bytes) of the tensors reachable from `obj`."""
    if id(obj) in seen or depth > 8:
        return 0, 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        storage = obj.untyped_storage()
        key = (obj.device, storage.data_ptr())
        if storage.data_ptr() and key in storages:
            return 0, 0
        storages.add(key)
        size = storage.nbytes() if storage.data_ptr() else obj.numel() * obj.element_size()
        return size, 0 if obj.is_floating_point() or obj.is_complex() else size
    if isinstance(obj, dict):
        children: Any = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        children = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        children = vars(obj).values()
    else:
        return 0, 0
    total = index = 0
    for child in children:
        t, i = _tensor_bytes(child, seen, storages, depth + 1)
        total, index = total + t, index + i
    return total, index


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> dict[str, float]:
    """`optimizer_state_bytes` (all state tensors) and `optimizer_state_index_bytes` (the integer ones)."""
    states: list[Any] = [opt.state]
    base = getattr(opt, "base", None)
    if isinstance(base, torch.optim.Optimizer):
        states.append(base.state)
    total, index = _tensor_bytes(states, set(), set())
    return {"optimizer_state_bytes": float(total), "optimizer_state_index_bytes": float(index)}


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: ``layers.<i>.<type>`` inside block i, else its layer type."""
    kind = layer_type(name)
    block = _BLOCK.search(name)
    return f"layers.{int(block.group(1))}.{kind}" if block else kind


def per_layer(summary: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Fold the ``spikes/param/<name>`` and ``max_gss/param/<name>`` entries of a monitor summary into layers:
    layer -> (spike count, largest GSS)."""
    out: dict[str, tuple[float, float]] = {}
    for key, count in summary.items():
        if not key.startswith("spikes/param/"):
            continue
        name = key.removeprefix("spikes/param/")
        layer = layer_of(name)
        spikes, top = out.get(layer, (0.0, 0.0))
        out[layer] = (spikes + count, max(top, summary.get(f"max_gss/param/{name}", 0.0)))
    return out


def without_per_param(summary: dict[str, float]) -> dict[str, float]:
    """The per-layer-type entries of a monitor summary (the per-parameter ones left out)."""
    return {k: v for k, v in summary.items() if "/param/" not in k}


class LayerSpikeLog:
    """Appends per-layer spike rows to a CSV file; on resume it drops the rows after the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[list[str]] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                kept = [row for row in csv.reader(f) if row and row[0] != "step" and int(row[0]) <= resume_step]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "layer", "spikes", "max_gss"])
            writer.writerows(kept)

    def append(self, step: int, layers: dict[str, tuple[float, float]]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows([step, layer, f"{s:g}", f"{m:.6g}"] for layer, (s, m) in layers.items())
