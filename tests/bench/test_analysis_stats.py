"""The statistics behind the papers' analyses, against direct computations on hand-made histories: gradient spikes
(per layer type and per layer), loss spikes, optimizer-state bytes, the heat-map matrix and INT2/INT3 training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import optimizers
from bench.analyses import spike_matrix
from tasks.base import LocalContext
from tasks.llm_pretrain import LLMPretrainTask
from tasks.llm_pretrain.quant import QuantSpec, quantize_activation, quantize_weight
from tasks.llm_pretrain.stats import (
    LAYER_CSV,
    LossSpikeCounter,
    layer_of,
    optimizer_state_bytes,
    per_layer,
    without_per_param,
)

NAMES = {  # parameter name -> shape, LLaMA-style so that layer types and blocks are read from the names
    "model.embed_tokens.weight": (6, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.up_proj.weight": (5, 4),
    "model.layers.0.input_layernorm.weight": (4,),
    "model.layers.1.self_attn.o_proj.weight": (4, 4),
    "model.norm.weight": (4,),
    "lm_head.weight": (6, 4),
}


class Named(nn.Module):
    """A module whose parameters carry the given dotted names."""

    def __init__(self) -> None:
        super().__init__()
        self.params = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.zeros(s)) for n, s in NAMES.items()})

    def named_parameters(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - nn.Module's signature
        for key, p in self.params.items():
            yield key.replace("__", "."), p


def gradient_history(steps: int = 12, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Heavy-tailed gradients with planted spikes, and entries that stay zero for a while (no history, no GSS)."""
    rng = np.random.default_rng(seed)
    hist: dict[str, list[np.ndarray]] = {}
    for name, shape in NAMES.items():
        gs = []
        for t in range(steps):
            g = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, shape)
            if t in (4, 9):
                mask = rng.random(shape) < 0.3
                g = np.where(mask, g * 400.0, g)
            if "embed" in name and t < 6:
                g[:2] = 0.0  # rows of tokens not seen yet
            gs.append(g.astype(np.float32))
        hist[name] = gs
    return hist


def direct_spikes(gs: list[np.ndarray], threshold: float, window: range) -> tuple[int, float]:
    """Spike count and largest GSS over the steps in `window` (0-based), by the definition, in float64."""
    count, top = 0, 0.0
    for t in window:
        if t == 0:
            continue
        past = np.mean(np.abs(np.stack(gs[:t]).astype(np.float64)), axis=0)
        valid = past > 0
        gss = np.abs(gs[t][valid]) / past[valid]
        count += int((gss > threshold).sum())
        top = max(top, float(gss.max(initial=0.0)))
    return count, top


def test_spike_monitor_agrees_with_a_direct_computation():
    model, hist, threshold = Named(), gradient_history(), 50.0
    monitor = optimizers.SpikeMonitor(model, threshold=threshold)
    params = dict(model.named_parameters())
    windows = [range(0, 5), range(5, 12)]
    for window in windows:
        for t in window:
            for name, p in params.items():
                p.grad = torch.from_numpy(hist[name][t])
            monitor.update()
        summary = monitor.summary(per_param=True)
        monitor.reset()
        direct = {name: direct_spikes(hist[name], threshold, window) for name in NAMES}
        for name, (count, top) in direct.items():
            assert summary[f"spikes/param/{name}"] == count
            assert summary[f"max_gss/param/{name}"] == pytest.approx(top, rel=1e-5)
        by_type: dict[str, int] = {}
        for name, (count, _) in direct.items():
            kind = optimizers.spike_monitor.layer_type(name)
            by_type[kind] = by_type.get(kind, 0) + count
        assert {k: v for k, v in without_per_param(summary).items() if k.startswith("spikes/")} == {
            **{f"spikes/{k}": float(v) for k, v in by_type.items()}, "spikes/total": float(sum(by_type.values()))}
        layers = per_layer(summary)
        assert set(layers) == {"embedding", "layers.0.attention", "layers.0.mlp", "layers.0.norm",
                               "layers.1.attention", "norm", "head"}
        assert layers["layers.0.attention"][0] == direct["model.layers.0.self_attn.q_proj.weight"][0]
        assert sum(s for s, _ in layers.values()) == summary["spikes/total"]
    assert sum(direct_spikes(hist[n], threshold, range(12))[0] for n in NAMES) > 20  # the planted spikes count


def test_layer_names_fold_blocks_and_types():
    assert layer_of("model.layers.11.self_attn.k_proj.weight") == "layers.11.attention"
    assert layer_of("model.layers.3.post_attention_layernorm.weight") == "layers.3.norm"
    assert layer_of("model.layers.3.mlp.down_proj.weight") == "layers.3.mlp"
    assert layer_of("model.embed_tokens.weight") == "embedding"
    assert layer_of("model.norm.weight") == "norm"
    assert layer_of("lm_head.weight") == "head"


def direct_loss_spikes(losses: list[float], ratio: float, window: int) -> list[int]:
    return [t for t in range(window, len(losses)) if losses[t] > ratio * sum(losses[t - window:t]) / window]


def test_loss_spike_counter_follows_its_definition_and_resumes():
    rng = np.random.default_rng(1)
    losses = list(np.linspace(8.0, 3.0, 60) + rng.normal(0, 0.05, 60))
    for t, factor in ((7, 3.0), (25, 1.6), (26, 1.45), (40, 2.0)):
        losses[t] *= factor
    expected = direct_loss_spikes(losses, 1.5, 5)
    assert expected == [7, 25, 40]  # step 7 counts; step 26 (x1.45) does not; steps < window are never spikes
    counter = LossSpikeCounter(1.5, 5, "cpu")
    for loss in losses[:30]:
        counter.update(torch.tensor(loss))
    first = counter.summary()
    assert first["loss_spikes"] == 2
    ratios = [losses[t] / np.mean(losses[t - 5:t]) for t in range(5, 30)]
    assert first["max_loss_ratio"] == pytest.approx(max(ratios), rel=1e-5)
    counter.reset()
    resumed = LossSpikeCounter(1.5, 5, "cpu")
    resumed.load_state_dict(counter.state_dict())
    for loss in losses[30:]:
        resumed.update(torch.tensor(loss))
    assert resumed.summary()["loss_spikes"] == 1 and resumed.total.item() == len(expected)


def test_optimizer_state_bytes_counts_every_state_tensor():
    layer = nn.Linear(4, 3)
    adam = torch.optim.Adam(layer.parameters())
    layer(torch.ones(2, 4)).sum().backward()
    adam.step()
    # exp_avg and exp_avg_sq of a 3x4 weight and a bias of 3, plus one float32 step counter per parameter
    assert optimizer_state_bytes(adam) == {"optimizer_state_bytes": (2 * 12 + 2 * 3) * 4 + 2 * 4,
                                           "optimizer_state_index_bytes": 0.0}
    weights = [nn.Parameter(torch.randn(16, 16)) for _ in range(2)]
    sparse = optimizers.build("spam", weights, density=0.25)
    for w in weights:
        w.grad = torch.randn_like(w)
    sparse.step()
    ints = sum(t.numel() * t.element_size() for s in sparse.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and not t.is_floating_point())
    measured = optimizer_state_bytes(sparse)
    assert measured["optimizer_state_index_bytes"] == ints > 0
    floats = sum(t.numel() * t.element_size() for s in sparse.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.is_floating_point())
    assert measured["optimizer_state_bytes"] == floats + ints
    assert floats < 2 * 2 * 16 * 16 * 4  # a quarter of the entries keep moments


def test_spike_matrix_orders_layers_and_bins_windows():
    rows = [{"step": str(s), "layer": layer, "spikes": str(n), "max_gss": "1"}
            for s in (10, 20, 30, 40)
            for layer, n in (("head", s), ("layers.10.mlp", 1), ("layers.2.attention", 2), ("embedding", 0))]
    layers, ends, counts = spike_matrix(rows, max_bins=2)
    assert layers == ["embedding", "layers.2.attention", "layers.10.mlp", "head"]
    assert ends == [20, 40]
    assert counts[3] == [30.0, 70.0] and counts[1] == [4.0, 4.0]


@pytest.mark.parametrize("bits", [2, 3])
def test_int2_and_int3_grids(bits):
    spec = QuantSpec("int4", group_size=32, int_bits=bits)
    w = torch.randn(8, 64)
    for group in quantize_weight(w, spec).reshape(-1, 32):
        assert len(torch.unique(group)) <= 2**bits
    x = torch.randn(4, 64)
    levels = 2 ** (bits - 1) - 1
    for group in quantize_activation(x, spec).reshape(-1, 32):
        assert len(torch.unique(group)) <= 2 * levels + 1 + spec.topk
    with pytest.raises(ValueError, match="int_bits"):
        QuantSpec("fp4", int_bits=bits)


@pytest.mark.slow
def test_quant_bits_config_is_checked_and_reaches_the_model(tmp_path: Path):
    task = LLMPretrainTask()
    with pytest.raises(ValidationError, match="quant_bits applies to the int formats"):
        task.config("smoke", {"quant": "fp4", "quant_bits": 3})
    with pytest.raises(ValidationError):
        task.config("smoke", {"quant": "int4", "quant_bits": 1})
    cfg = task.config("smoke", {"quant": "int4", "quant_bits": 2, "quant_group_size": 32, "steps": 6,
                                "eval_every": 6, "log_every": 3, "spike_monitor": True})
    ctx = LocalContext(seed=0, device="cpu", workdir=tmp_path)
    result = task.run(cfg, "adamw", {}, ctx)
    assert math.isfinite(result["val_loss"])
    assert ctx.series("optimizer_state_bytes")[0][0] == 1 and result["optimizer_state_bytes"] > 0
    assert [s for s, _ in ctx.series("loss_spikes")] == [3, 6] and result["loss_spikes_total"] == 0
    lines = (ctx.artifact_dir / LAYER_CSV).read_text().splitlines()
    assert lines[0] == "step,layer,spikes,max_gss" and {ln.split(",")[0] for ln in lines[1:]} == {"3", "6"}


class Killed(Exception):
    pass


class KilledAfterCheckpoint(LocalContext):
    """Dies right after its first checkpoint is written, as a killed trial would."""

    def save_checkpoint(self, state: dict) -> None:
        super().save_checkpoint(state)
        raise Killed


@pytest.mark.slow
def test_resumed_trial_keeps_its_statistics(tmp_path: Path):
    task = LLMPretrainTask()
    cfg = task.config("smoke", {"steps": 24, "checkpoint_every": 10, "eval_every": 12, "log_every": 4,
                                "spike_monitor": True, "loss_spike_window": 3, "loss_spike_ratio": 1.002})
    full_ctx = LocalContext(seed=0, device="cpu", workdir=tmp_path / "full")
    full = task.run(cfg, "adamw", {}, full_ctx)
    with pytest.raises(Killed):
        task.run(cfg, "adamw", {}, KilledAfterCheckpoint(seed=0, device="cpu", workdir=tmp_path / "resumed"))
    resumed_ctx = LocalContext(seed=0, device="cpu", workdir=tmp_path / "resumed")
    resumed = task.run(cfg, "adamw", {}, resumed_ctx)
    assert full["loss_spikes_total"] >= 1  # the low ratio makes the late, noisy steps count
    keys = ("loss_spikes_total", "optimizer_state_bytes", "optimizer_state_index_bytes")
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}
    assert resumed_ctx.series("loss_spikes") == [p for p in full_ctx.series("loss_spikes") if p[0] > 10]
    assert (resumed_ctx.artifact_dir / LAYER_CSV).read_text() == (full_ctx.artifact_dir / LAYER_CSV).read_text()
