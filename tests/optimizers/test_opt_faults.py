"""The faults of the public code stay fixed; step() has no host syncs; the package imports with torch alone."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import optimizers
from optimizers import SPAM, StableSPAM
from optimizers import functional as F

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


def _feed(opt, params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


def _pair(make, steps: int, spike: float):
    """Two identical runs of `steps` normal gradients; returns params/optimizers before a final spiked step."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 8, generator=gen, dtype=torch.float64) for _ in range(steps)]
    spiked = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    spiked[2, 3] *= spike
    out = []
    for clip in (True, False):
        p = torch.zeros(8, 8, dtype=torch.float64, requires_grad=True)
        opt = make([p], clip)
        for g in grads:
            _feed(opt, [p], [g])
        out.append((p, opt))
    return out, spiked


def test_spam_clipping_changes_the_update_on_a_spiked_step():
    runs, spiked = _pair(lambda ps, clip: SPAM(ps, threshold=5000.0 if clip else math.inf), 30, 1e4)
    (p_clip, opt_clip), (p_raw, opt_raw) = runs
    assert torch.equal(p_clip, p_raw)
    v_before = opt_clip.state[p_clip]["exp_avg_sq"].clone()
    m_before = opt_clip.state[p_clip]["exp_avg"].clone()
    before = p_clip.detach().clone()
    _feed(opt_clip, [p_clip], [spiked])
    _feed(opt_raw, [p_raw], [spiked])
    step_clip = (p_clip.detach() - before)[2, 3]
    step_raw = (p_raw.detach() - before)[2, 3]
    assert abs(float(step_clip - step_raw)) > 0.05 * abs(float(step_raw)), "clipping must change the update"
    # The clipped gradient, not a copy that is thrown away, enters the moments.
    bound = math.sqrt(5000.0 * float(v_before[2, 3]))
    expected_m = 0.9 * float(m_before[2, 3]) + 0.1 * math.copysign(bound, float(spiked[2, 3]))
    expected_v = 0.999 * float(v_before[2, 3]) + 0.001 * bound**2
    assert float(opt_clip.state[p_clip]["exp_avg"][2, 3]) == pytest.approx(expected_m, rel=1e-12)
    assert float(opt_clip.state[p_clip]["exp_avg_sq"][2, 3]) == pytest.approx(expected_v, rel=1e-12)
    assert float(opt_raw.state[p_raw]["exp_avg_sq"][2, 3]) > 100 * expected_v
    # Other coordinates were not spiked and are not clipped.
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[2, 3] = False
    assert torch.equal(p_clip.detach()[mask], p_raw.detach()[mask])


def test_stable_spam_adaclip_changes_the_update_on_a_spiked_step():
    runs, spiked = _pair(lambda ps, clip: StableSPAM(ps), 30, 1e4)
    (p_clip, opt_clip), (p_raw, opt_raw) = runs
    assert torch.equal(p_clip, p_raw)
    # From here on the second run goes without AdaClip: the spiked step must then move the parameters differently.
    opt_raw.pipeline = dataclasses.replace(opt_raw.pipeline, components=frozenset({"moret", "adagn"}))
    _feed(opt_clip, [p_clip], [spiked])
    _feed(opt_raw, [p_raw], [spiked])
    assert not torch.equal(p_clip, p_raw)
    for key in ("exp_avg", "exp_avg_sq"):  # the clipped gradient, not a discarded copy, enters the moments
        assert not torch.allclose(opt_clip.state[p_clip][key], opt_raw.state[p_raw][key], rtol=1e-3)


def test_adaclip_and_spike_clip_math_on_a_small_tensor():
    g = torch.tensor([1.0, -2.0, 10.0, -0.5], dtype=torch.float64)
    threshold = torch.tensor(3.0, dtype=torch.float64)  # T after the update below: 0.5 * 3 + 0.5 * 10 = 6.5
    F.adaclip_([g], [threshold], 0.5, [0.5])  # T_hat = 13: nothing exceeds it
    assert torch.equal(g, torch.tensor([1.0, -2.0, 10.0, -0.5], dtype=torch.float64))
    threshold = torch.tensor(0.0, dtype=torch.float64)
    F.adaclip_([g], [threshold], 0.5, [1.0])  # T = T_hat = 5: only 10 exceeds it, and becomes 10 * 5 / 10
    assert torch.equal(g, torch.tensor([1.0, -2.0, 5.0, -0.5], dtype=torch.float64))
    g = torch.tensor([3.0, -3.0, 0.5, 0.0], dtype=torch.float64)
    v = torch.tensor([0.0004, 0.0004, 0.0004, 0.0], dtype=torch.float64)
    F.spike_clip_([g], [v], 5000.0)  # bound sqrt(5000 * 0.0004) = sqrt(2)
    assert torch.allclose(g, torch.tensor([2**0.5, -(2**0.5), 0.5, 0.0], dtype=torch.float64))


def test_zero_gradient_stays_zero_through_adaclip_and_adagn():
    p = torch.ones(3, 3, dtype=torch.float64, requires_grad=True)
    opt = StableSPAM([p])
    p.grad = torch.zeros(3, 3, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, 3, dtype=torch.float64))
    assert all(torch.isfinite(v).all() for v in opt.state[p].values() if isinstance(v, torch.Tensor))


def test_warmup_longer_than_reset_interval_is_rejected():
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="never reach its full size.*public SPAM training script"):
        SPAM(params, warmup_steps=1000)
    with pytest.raises(ValueError, match="warmup_steps=600 is longer than reset_interval=500"):
        optimizers.build("spam", params, warmup_steps=600)
    with pytest.raises(ValueError, match="longer than reset_interval"):
        optimizers.build("adam+moret", params, reset_interval=100, warmup_steps=150)
    with pytest.raises(optimizers.OptimizerConfigError, match="'warmup_steps'"):
        optimizers.build("adam+spikeclip", params, warmup_steps=10)
    with pytest.raises(ValueError, match="needs the 'moret' component"):
        optimizers.SpikeAwareAdam(params, components=("spikeclip",), warmup_steps=10)
    SPAM(params, warmup_steps=500)  # a warmup as long as the interval is allowed


def test_the_public_scripts_warmup_trains_at_about_a_fifth():
    """With N = 1000 > reset interval 500, s(j) for j < 500 averages about 0.19 and never reaches 1."""
    factors = [F.spam_warmup_factor(j, 1000) for j in range(500)]
    assert max(factors) < 0.51
    assert sum(factors) / len(factors) == pytest.approx(0.19, abs=0.01)
    assert F.spam_warmup_factor(0, 150) == pytest.approx(0.01)
    assert F.spam_warmup_factor(150, 150) == 1.0


@pytest.mark.parametrize("name", ["spam", "stable_spam", "adam+moret+gradclip+adaclip", "lion+adagn+adaclip",
                                  "sgd+moret+spikeclip"])
def test_p_grad_is_unchanged_after_step(name):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(6, 4, generator=gen, requires_grad=True), torch.randn(4, generator=gen, requires_grad=True)]
    opt = optimizers.build(name, params, **({"lr": 1e-3} if name.startswith("sgd") else {}))
    for k in range(30):
        grads = [torch.randn(p.shape, generator=gen) * (1e4 if k == 25 else 1.0) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        for p, g in zip(params, grads, strict=True):
            assert p.grad is g
            assert torch.equal(p.grad, g.clone()) and torch.isfinite(p).all()


@pytest.mark.parametrize("name,hp", [
    ("spam", {"reset_interval": 25, "warmup_steps": 5, "density": 0.5}),
    ("stable_spam", {"reset_interval": 25, "total_steps": 40}),
    ("stable_spam", {"reset_interval": 25, "variant": "clean", "state_dtype": "float32"}),
    ("adam+moret+gradclip+adaclip", {"reset_interval": 25}),
    ("adamw+moret+adagn+spikeclip", {"reset_interval": 25, "weight_decay": 0.1}),
    ("lion+moret+gradclip+adaclip+adagn+spikeclip", {"reset_interval": 25}),
])
def test_step_has_no_host_sync(monkeypatch, name, hp):
    """No .item(), no tensor truth value, no host copy inside step() (they would raise here)."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(6, 4, generator=gen, requires_grad=True), torch.randn(4, generator=gen, requires_grad=True)]
    opt = optimizers.build(name, params, **hp)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(60)]

    def boom(*args, **kwargs):
        raise AssertionError("host sync inside step()")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, method, boom)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g
        opt.step()
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.slow
def test_importing_needs_only_torch():
    code = textwrap.dedent(
        """
        import sys
        for name in ("transformers", "adam_mini", "lion_pytorch", "galore_torch", "bitsandbytes"):
            sys.modules[name] = None  # importing any of them now fails
        import torch
        from optimizers import SPAM, StableSPAM, build, available, SpikeMonitor
        p = torch.nn.Parameter(torch.ones(3))
        for opt in (SPAM([p]), StableSPAM([p]), build("adam+moret+adagn+adaclip", [p])):
            p.grad = torch.ones(3)
            opt.step()
        assert "stable_spam" in available() and "lion" not in available()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
