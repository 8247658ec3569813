"""Precision options and param groups: bf16 vs float32 state, per-group learning rates, LR schedulers."""

from __future__ import annotations

import pytest
import torch

import optimizers
from optimizers import SPAM, SpikeAwareAdam, StableSPAM

torch.set_num_threads(1)


def test_float32_state_keeps_the_second_moment_that_bf16_state_loses():
    """DESIGN.md, "Precision": in bf16, 0.999 * v rounds back to v, so the EMA of g^2 never decays."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(512, generator=gen).to(torch.bfloat16) for _ in range(3000)]
    results = {}
    for state_dtype in ("param", "float32"):
        p = torch.zeros(512, dtype=torch.bfloat16, requires_grad=True)
        opt = SpikeAwareAdam([p], lr=0.0, state_dtype=state_dtype)
        for g in grads:
            p.grad = g
            opt.step()
        results[state_dtype] = opt.state[p]["exp_avg_sq"].double()
    reference = torch.zeros(512, dtype=torch.float64)
    for g in grads:
        reference = 0.999 * reference + 0.001 * g.double() ** 2
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    assert float(results["float32"].mean()) == pytest.approx(float(reference.mean()), rel=1e-3)
    assert float(results["param"].mean()) > 1.4 * float(reference.mean())


@pytest.mark.parametrize("cls", [SPAM, StableSPAM])
def test_bf16_params_with_float32_state(cls):
    p = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = cls([p], state_dtype="float32")
    for _ in range(5):
        p.grad = torch.randn(6, 4, dtype=torch.bfloat16)
        opt.step()
    assert p.dtype == torch.bfloat16
    for key, value in opt.state[p].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.dtype == torch.float32, key
    assert optimizers.resolved_hparams(opt)["state_dtype"] == "float32"


def test_default_state_follows_the_parameter_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        p = torch.randn(3, 3, dtype=dtype, requires_grad=True)
        opt = StableSPAM([p])
        p.grad = torch.randn(3, 3, dtype=dtype)
        opt.step()
        assert opt.state[p]["exp_avg_sq"].dtype == dtype
        assert opt.state[p]["clip_threshold"].dtype == dtype


@pytest.mark.parametrize("cls", [SPAM, StableSPAM])
def test_param_groups_use_their_own_lr(cls):
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)] for _ in range(12)]
    a1, b1 = torch.ones(4, 3, requires_grad=True), torch.ones(5, requires_grad=True)
    a2, b2 = torch.ones(4, 3, requires_grad=True), torch.ones(5, requires_grad=True)
    both = cls([{"params": [a1], "lr": 1e-2}, {"params": [b1], "lr": 1e-3}], reset_interval=5, **(
        {"warmup_steps": 2} if cls is SPAM else {}))
    first = cls([a2], lr=1e-2, reset_interval=5, **({"warmup_steps": 2} if cls is SPAM else {}))
    second = cls([b2], lr=1e-3, reset_interval=5, **({"warmup_steps": 2} if cls is SPAM else {}))
    for ga, gb in grads:
        a1.grad, b1.grad, a2.grad, b2.grad = ga, gb, ga.clone(), gb.clone()
        both.step()
        first.step()
        second.step()
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_lr_scheduler_drives_the_update():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, generator=gen) for _ in range(10)]
    p1 = torch.zeros(4, requires_grad=True)
    p2 = torch.zeros(4, requires_grad=True)
    scheduled = StableSPAM([p1], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(scheduled, lambda step: 0.5**step)
    manual = StableSPAM([p2], lr=1e-2)
    for k, g in enumerate(grads):
        manual.param_groups[0]["lr"] = 1e-2 * 0.5**k
        p1.grad, p2.grad = g, g.clone()
        scheduled.step()
        sched.step()
        manual.step()
    assert torch.equal(p1, p2)
    assert scheduled.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**10)


def test_wrapper_lr_reaches_the_package_base():
    pytest.importorskip("lion_pytorch")
    p = torch.zeros(3, requires_grad=True)
    opt = optimizers.build("lion+adaclip", [p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1)
    assert opt.base.param_groups[0]["lr"] == pytest.approx(1e-4)
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    assert torch.allclose(p.detach(), torch.full((3,), -1e-4))


def test_invalid_values_are_rejected():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="state_dtype"):
        SPAM(p, state_dtype="bfloat16")
    with pytest.raises(ValueError, match="variant"):
        StableSPAM(p, variant="paper")
    with pytest.raises(ValueError, match="density"):
        SPAM(p, density=0.0)
    with pytest.raises(ValueError, match="moret_mode"):
        optimizers.build("adam+moret", p, moret_mode="sometimes")
    with pytest.raises(ValueError, match="gamma3"):
        StableSPAM(p, gamma3=1.0)
