"""SpikeMonitor: the Gradient Spike Score over past steps, per layer type, without host syncs in update()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimizers import SpikeMonitor
from optimizers.spike_monitor import layer_type


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(5, 4)
        self.q_proj = nn.Linear(4, 4, bias=False)
        self.up_proj = nn.Linear(4, 4, bias=False)
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 5, bias=False)
        self.extra = nn.Parameter(torch.zeros(3))


def set_grads(model: nn.Module, value: float = 1.0) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


def test_layer_types_from_llama_names():
    assert layer_type("model.embed_tokens.weight") == "embedding"
    assert layer_type("model.layers.3.self_attn.q_proj.weight") == "attention"
    assert layer_type("model.layers.3.self_attn.o_proj.weight") == "attention"
    assert layer_type("model.layers.3.mlp.gate_proj.weight") == "mlp"
    assert layer_type("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert layer_type("model.layers.3.input_layernorm.weight") == "norm"
    assert layer_type("model.layers.3.self_attn.q_norm.weight") == "norm"
    assert layer_type("model.norm.weight") == "norm"
    assert layer_type("lm_head.weight") == "head"
    assert layer_type("transformer.h.0.ln_1.weight") == "norm"
    assert layer_type("transformer.wte.weight") == "embedding"
    assert layer_type("policy_net.0.weight") == "other"


def test_gss_counts_spikes_against_the_mean_of_past_steps():
    model = Named()
    monitor = SpikeMonitor(model, threshold=50.0)
    set_grads(model)
    monitor.update()  # first step: no history, no spikes
    assert monitor.summary()["spikes/total"] == 0.0
    for _ in range(3):
        set_grads(model)
        monitor.update()
    summary = monitor.summary()
    assert summary["spikes/total"] == 0.0 and summary["max_gss/total"] == pytest.approx(1.0)
    set_grads(model)
    model.q_proj.weight.grad[1, 2] = 100.0  # GSS = 100 / mean(1, 1, 1, 1) = 100
    model.up_proj.weight.grad[0, 0] = -40.0  # GSS 40: not a spike
    monitor.update()
    summary = monitor.summary()
    assert summary["spikes/attention"] == 1.0
    assert summary["max_gss/attention"] == pytest.approx(100.0)
    assert summary["spikes/mlp"] == 0.0 and summary["max_gss/mlp"] == pytest.approx(40.0)
    assert summary["spikes/total"] == 1.0
    assert set(summary) >= {f"{kind}/{t}" for kind in ("spikes", "max_gss")
                            for t in ("embedding", "attention", "mlp", "norm", "head", "other")}
    # The spike enters the history: the mean of |g| at [1, 2] is now (4 + 100) / 5.
    set_grads(model)
    model.q_proj.weight.grad[1, 2] = 20.8 * 60
    monitor.reset()
    monitor.update()
    summary = monitor.summary()
    assert summary["max_gss/attention"] == pytest.approx(60.0)
    assert summary["spikes/attention"] == 1.0


def test_entries_without_history_are_not_spikes():
    model = Named()
    monitor = SpikeMonitor(model)
    set_grads(model, 0.0)
    monitor.update()
    monitor.update()
    set_grads(model, 1.0)  # every entry jumps from an all-zero history
    monitor.update()
    assert monitor.summary()["spikes/total"] == 0.0


def test_reset_and_sampling():
    model = Named()
    monitor = SpikeMonitor(model, every=2)
    for k in range(4):
        set_grads(model)
        if k == 3:
            model.lm_head.weight.grad[0, 0] = 1000.0  # an unmeasured update (k = 3 is odd)
        monitor.update()
    assert monitor.summary()["spikes/total"] == 0.0
    set_grads(model)
    model.lm_head.weight.grad[0, 1] = 1000.0  # measured (k = 4)
    monitor.update()
    summary = monitor.summary(per_param=True)
    assert summary["spikes/head"] == 1.0 and summary["spikes/param/lm_head.weight"] == 1.0
    monitor.reset()
    assert monitor.summary()["spikes/total"] == 0.0 and monitor.summary()["max_gss/total"] == 0.0


def test_update_has_no_host_sync(monkeypatch):
    model = Named()
    monitor = SpikeMonitor(model)

    def boom(*args, **kwargs):
        raise AssertionError("host sync inside update()")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, boom)
    for _ in range(3):
        set_grads(model)
        monitor.update()
    monkeypatch.undo()
    assert monitor.summary()["spikes/total"] == 0.0


def test_state_dict_round_trip():
    model = Named()
    monitor = SpikeMonitor(model)
    for _ in range(3):
        set_grads(model)
        monitor.update()
    other = SpikeMonitor(model)
    other.load_state_dict(monitor.state_dict())
    set_grads(model)
    model.norm.weight.grad[0] = 77.0
    monitor.update()
    other.update()
    assert monitor.summary() == other.summary()
    assert other.summary()["spikes/norm"] == 1.0
