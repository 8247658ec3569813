"""Compositions that are mathematically the same optimizer agree: SPAM, Stable-SPAM, torch Adam/AdamW, package bases.

Also how moret acts on package bases (which state it zeroes, which counter it restarts) and the warmup on them.
"""

from __future__ import annotations

import pytest
import torch

import optimizers
from optimizers import SPAM, StableSPAM

torch.set_num_threads(1)
SHAPES = [(6, 5), (7,), (2, 3, 4)]


def stream(steps: int, seed: int, dtype: torch.dtype = torch.float64) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(1, steps + 1):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        if k % 6 == 0:
            grads[0].view(-1)[3] *= 500.0
        out.append([g.to(dtype) for g in grads])
    return out


def trajectory(make, grads_stream, seed: int = 0, dtype: torch.dtype = torch.float64, clip: float | None = None):
    gen = torch.Generator().manual_seed(seed + 99)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True) for s in SHAPES]
    opt = make(params)
    out = []
    for grads in grads_stream:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out, opt, params


def assert_same(a, b, exact: bool = True):
    for step, (xs, ys) in enumerate(zip(a, b, strict=True)):
        for x, y in zip(xs, ys, strict=True):
            if exact:
                assert torch.equal(x, y), f"differs at step {step + 1}"
            else:
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14, msg=f"step {step + 1}")


def test_spam_is_adamw_moret_spikeclip():
    s = stream(75, 1)
    cfg = dict(lr=2e-3, eps=1e-6, weight_decay=0.1, reset_interval=25, warmup_steps=8, threshold=5000.0)
    ref, _, _ = trajectory(lambda ps: SPAM(ps, density=0.5, **cfg), s)
    comp, opt, _ = trajectory(
        lambda ps: optimizers.build("adamw+moret+spikeclip", ps, adam_form="spam", moret_mode="spam", density=0.5,
                                    **cfg), s)
    assert_same(ref, comp)
    assert optimizers.resolved_hparams(opt)["components"] == "moret+spikeclip"


@pytest.mark.parametrize("variant,mode", [("reference", "stable_spam"), ("clean", "clean")])
def test_stable_spam_is_adamw_moret_adagn_adaclip(variant, mode):
    s = stream(70, 2)
    cfg = dict(lr=2e-3, weight_decay=0.1, reset_interval=20, total_steps=50)
    ref, _, _ = trajectory(lambda ps: StableSPAM(ps, variant=variant, **cfg), s)
    comp, _, _ = trajectory(lambda ps: optimizers.build("adamw+moret+adagn+adaclip", ps, moret_mode=mode, **cfg), s)
    assert_same(ref, comp)


def test_stable_spam_is_the_table_4_row_without_weight_decay():
    s = stream(50, 3)
    ref, _, _ = trajectory(lambda ps: optimizers.build("stable_spam", ps, reset_interval=20), s)
    comp, _, _ = trajectory(lambda ps: optimizers.build("adam+moret+adagn+adaclip", ps, reset_interval=20), s)
    assert_same(ref, comp)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_in_house_adam_is_torch_adam(wd):
    s = stream(30, 4)
    ref, _, _ = trajectory(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=wd, foreach=True), s)
    comp, _, _ = trajectory(lambda ps: optimizers.build("adam+gradclip", ps, lr=1e-2, weight_decay=wd,
                                                        max_norm=1e30), s)
    assert_same(ref, comp)
    ref, _, _ = trajectory(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=wd, foreach=True), s)
    comp, _, _ = trajectory(lambda ps: optimizers.build("adamw+gradclip", ps, lr=1e-2, weight_decay=wd,
                                                        max_norm=1e30), s)
    assert_same(ref, comp)


def test_gradclip_is_clip_grad_norm():
    s = stream(30, 5)
    ref, _, _ = trajectory(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True), s, clip=1.0)
    comp, _, _ = trajectory(lambda ps: optimizers.build("adamw+gradclip", ps, lr=1e-2), s)
    assert_same(ref, comp, exact=False)
    pytest.importorskip("lion_pytorch")
    from lion_pytorch import Lion

    ref, _, _ = trajectory(lambda ps: Lion(ps, lr=1e-3), s, clip=1.0)
    comp, _, _ = trajectory(lambda ps: optimizers.build("lion+gradclip", ps, lr=1e-3), s)
    assert_same(ref, comp, exact=False)


def test_adaclip_adagn_on_lion_match_the_equations():
    """The wrapper hands Lion the gradient transformed by AdaClip then AdaGN, as written in DESIGN.md."""
    pytest.importorskip("lion_pytorch")
    from lion_pytorch import Lion

    s = stream(20, 6)
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(sh, generator=gen, dtype=torch.float64, requires_grad=True) for sh in SHAPES]
    shadow = [p.detach().clone().requires_grad_(True) for p in params]
    wrapped = optimizers.build("lion+adagn+adaclip", params, lr=1e-3)
    lion = Lion(shadow, lr=1e-3)
    state = [{"T": 0.0, "mu": 0.0, "nu": 0.0} for _ in SHAPES]
    for c, grads in enumerate(s, start=1):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        wrapped.step()
        for q, g, st in zip(shadow, grads, state, strict=True):
            m = float(g.abs().max())
            st["T"] = 0.999 * st["T"] + 0.001 * m
            t_hat = st["T"] / (1 - 0.999**c)
            g = torch.where(g.abs() > t_hat, g * t_hat / m, g)
            n = float(g.norm())
            st["mu"] = 0.7 * st["mu"] + 0.3 * n
            st["nu"] = 0.9 * st["nu"] + 0.1 * n * n
            g = g / n * (st["mu"] / (1 - 0.7**c)) / ((st["nu"] / (1 - 0.9**c)) ** 0.5 + 1e-8)
            q.grad = g
        lion.step()
        for p, q in zip(params, shadow, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["stable_spam", "clean", "spam"])
def test_moret_on_sgd_momentum(mode):
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = optimizers.build("sgd+moret", [p], lr=0.1, momentum=0.9, reset_interval=3, moret_mode=mode)
    grads = [torch.full((4,), float(i + 1), dtype=torch.float64) for i in range(4)]
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    buf = opt.base.state[p]["momentum_buffer"]
    if mode == "stable_spam":  # the reset step used the old buffer; zeros are installed afterwards
        assert torch.equal(buf, torch.zeros(4, dtype=torch.float64))
    else:  # zeroed before the update: the buffer holds only this step's gradient
        assert torch.equal(buf, grads[2])


@pytest.mark.parametrize("mode,counter", [("stable_spam", 1), ("clean", 1), ("spam", 4)])
def test_moret_on_adafactor_counter(mode, counter):
    pytest.importorskip("transformers")
    p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    opt = optimizers.build("adafactor+moret", [p], reset_interval=4, moret_mode=mode)
    for _ in range(4):
        p.grad = torch.randn(4, 3, dtype=torch.float64)
        opt.step()
    state = opt.base.state[p]
    assert state["step"] == counter
    zeroed = mode == "stable_spam"
    assert bool((state["exp_avg_sq_row"] == 0).all()) is zeroed
    assert bool((state["exp_avg"] == 0).all()) is zeroed


def test_warmup_on_a_package_base_scales_the_update_and_restores_lr():
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = optimizers.build("sgd+moret", [p], lr=0.5, momentum=0.0, reset_interval=4, warmup_steps=2,
                           moret_mode="spam")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    updates = []
    for _ in range(6):
        before = p.detach().clone()
        p.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
        sched.step()
        updates.append(float((before - p.detach())[0]))
        assert opt.param_groups[0]["lr"] == 0.5
    # s(0) = 0.01 on the reset step (k = 4), s(1) = 1 - 0.495 * (1 + cos(pi / 3)) afterwards, then 1.
    expected = [0.5, 0.5, 0.5, 0.5 * 0.01, 0.5 * (1 - 0.495 * 1.5), 0.5]
    for got, want in zip(updates, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-12)
