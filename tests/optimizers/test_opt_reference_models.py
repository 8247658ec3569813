"""SPAM and Stable-SPAM against independent float64 models written from DESIGN.md's equations.

The models below loop over tensors in plain Python and follow the spec line by line; they share no code with the
package. Gradients are random, with spikes injected (x1000 on a few entries) and an all-zero gradient now and then,
over enough steps to cross three momentum resets and SPAM's clipping windows.
"""

from __future__ import annotations

import math

import pytest
import torch

from optimizers import SPAM, StableSPAM

SHAPES = [(5, 7), (11,), (3, 4, 2)]


def gradient_stream(steps: int, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for k in range(1, steps + 1):
        grads = []
        for j, shape in enumerate(SHAPES):
            scale = 0.5 + torch.rand((), generator=gen, dtype=torch.float64)
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
            if k % 7 == 3 or k % 10 in (9, 0):  # spikes on a few entries, also on both sides of SPAM's window
                flat = g.view(-1)
                idx = torch.randint(0, flat.numel(), (2,), generator=gen)
                flat[idx] *= 1000.0
            if k % 13 == 5 and j == 1:  # an all-zero gradient
                g.zero_()
            grads.append(g)
        stream.append(grads)
    return stream


def initial_params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]


def run_optimizer(cls: type, stream: list[list[torch.Tensor]], seed: int, **kwargs) -> list[list[torch.Tensor]]:
    params = [p.clone().requires_grad_(True) for p in initial_params(seed)]
    opt = cls(params, **kwargs)
    history = []
    for grads in stream:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


# --- SPAM, from the spec --------------------------------------------------------------------------------------------


class SpamModel:
    def __init__(self, params, lr, betas, eps, weight_decay, reset_interval, warmup_steps, threshold):
        self.p = [p.clone() for p in params]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = [0 for _ in params]
        self.k = 0
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.dT, self.N, self.theta = reset_interval, warmup_steps, threshold
        self.clipped = 0

    def scale(self) -> float:
        if self.k < self.dT:
            return 1.0
        j = self.k % self.dT
        if j < self.N:
            return 1.0 - 0.495 * (1.0 + math.cos(math.pi * j / (self.N + 1)))
        return 1.0

    def step(self, grads, subsets=None):
        self.k += 1
        for i, g0 in enumerate(grads):
            g = g0.clone()
            sub = None if subsets is None else subsets[i]
            if sub is not None:
                g = g.reshape(-1)[sub]
            if self.k % self.dT == 0:
                self.m[i] = torch.zeros_like(g)
                self.v[i] = torch.zeros_like(g)
            if self.m[i].shape != g.shape:  # first update of a sparse tensor
                self.m[i] = torch.zeros_like(g)
                self.v[i] = torch.zeros_like(g)
            s = self.scale()
            if self.k % self.dT >= 20:
                spike = g**2 > self.theta * self.v[i]
                self.clipped += int(spike.sum())
                g = torch.where(spike, torch.sign(g) * torch.sqrt(self.theta * self.v[i]), g)
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g**2
            update = s * self.lr * math.sqrt(1 - self.b2**t) / (1 - self.b1**t) * self.m[i] / (
                torch.sqrt(self.v[i]) + self.eps)
            if sub is None:
                self.p[i] = self.p[i] - update
            else:
                flat = self.p[i].reshape(-1).clone()
                flat[sub] = flat[sub] - update
                self.p[i] = flat.reshape(self.p[i].shape)
            self.p[i] = self.p[i] - self.lr * self.wd * self.p[i]


SPAM_CASES = [
    dict(weight_decay=0.0),
    dict(weight_decay=0.1),
    dict(weight_decay=0.05, lr=3e-3, betas=(0.8, 0.99), eps=1e-5),
]


@pytest.mark.parametrize("kwargs", SPAM_CASES)
def test_spam_matches_float64_model(kwargs):
    steps, seed = 100, 1
    cfg = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, reset_interval=30, warmup_steps=10, threshold=5000.0)
    cfg.update(kwargs)
    stream = gradient_stream(steps, seed)
    history = run_optimizer(SPAM, stream, seed, **cfg)
    model = SpamModel(initial_params(seed), **cfg)
    for k, grads in enumerate(stream):
        model.step(grads)
        for got, want in zip(history[k], model.p, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=f"step {k + 1}")
    assert model.k // cfg["reset_interval"] >= 3
    assert model.clipped > 0, "the stream must trigger spike clipping"


def test_sparse_spam_matches_float64_model():
    steps, seed = 95, 2
    cfg = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-6, reset_interval=30, warmup_steps=10, threshold=5000.0)
    stream = gradient_stream(steps, seed)
    params = [p.clone().requires_grad_(True) for p in initial_params(seed)]
    opt = SPAM(params, weight_decay=0.1, density=0.4, **cfg)
    model = SpamModel(initial_params(seed), weight_decay=0.1, **cfg)
    seen_subsets = {i: [] for i in range(len(params))}
    for k, grads in enumerate(stream):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        # The subset in use at step k (drawn before the update on a reset step) is the one in the state afterwards.
        subsets = [opt.state[p]["subset"].long() if "subset" in opt.state[p] else None for p in params]
        for i, s in enumerate(subsets):
            if s is not None and (not seen_subsets[i] or not torch.equal(seen_subsets[i][-1], s)):
                seen_subsets[i].append(s)
        model.step(grads, subsets)
        for got, want in zip(params, model.p, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-7, atol=1e-10, msg=f"step {k + 1}")
    # Only the 2-D tensor is sparse; its subset has int(0.4 * 35) entries and is redrawn at each of the 3 resets.
    assert [len(v) for v in seen_subsets.values()] == [4, 0, 0]
    assert all(s.numel() == int(0.4 * 35) for s in seen_subsets[0])


# --- Stable-SPAM, from the spec -------------------------------------------------------------------------------------


class StableSpamModel:
    def __init__(self, params, lr, betas, eps, weight_decay, gamma1, gamma2, gamma3, reset_interval, total_steps,
                 eta_min, variant):
        n = len(params)
        self.p = [p.clone() for p in params]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.c = [0] * n  # the reference's single counter; in the clean variant Adam's counter
        self.c_stats = [0] * n  # clean variant only: never reset
        self.T = [0.0] * n
        self.mu = [0.0] * n
        self.nu = [0.0] * n
        self.k = 0
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.g1, self.g2, self.g3 = gamma1, gamma2, gamma3
        self.dT, self.total, self.eta_min, self.variant = reset_interval, total_steps, eta_min, variant
        self.adaclipped = 0

    def step(self, grads):
        self.k += 1
        k = self.k
        if self.total is None:
            a = 1.0
        else:
            a = self.eta_min + (1 - self.eta_min) * (1 + math.cos(math.pi * k / (self.total + 1))) / 2
        b1, g1 = self.b1 * a, self.g1 * a
        for i, g0 in enumerate(grads):
            g = g0.clone()
            self.p[i] = self.p[i] * (1 - self.lr * self.wd)
            self.c[i] += 1
            self.c_stats[i] += 1
            cs = self.c[i] if self.variant == "reference" else self.c_stats[i]
            # AdaClip
            M = float(g.abs().max())
            self.T[i] = self.g3 * self.T[i] + (1 - self.g3) * M
            T_hat = self.T[i] / (1 - self.g3**cs)
            over = g.abs() > T_hat
            self.adaclipped += int(over.sum())
            g = torch.where(over, g * (T_hat / M) if M > 0 else g, g)
            # AdaGN
            n = float(g.norm())
            self.mu[i] = g1 * self.mu[i] + (1 - g1) * n
            self.nu[i] = self.g2 * self.nu[i] + (1 - self.g2) * n**2
            mu_hat = self.mu[i] / (1 - g1**cs)
            nu_hat = self.nu[i] / (1 - self.g2**cs)
            if n > 0:
                g = g / n * mu_hat / (math.sqrt(nu_hat) + self.eps)
            # MoRet
            reset = k % self.dT == 0
            if reset and self.variant == "reference":
                self.c[i] = 1
            if reset and self.variant == "clean":
                self.m[i] = torch.zeros_like(g)
                self.v[i] = torch.zeros_like(g)
                self.c[i] = 1
            # Adam
            c = self.c[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g**2
            self.p[i] = self.p[i] - self.lr / (1 - b1**c) * self.m[i] / (
                torch.sqrt(self.v[i]) / math.sqrt(1 - self.b2**c) + self.eps)
            if reset and self.variant == "reference":
                self.m[i] = torch.zeros_like(g)
                self.v[i] = torch.zeros_like(g)


STABLE_CASES = [
    dict(weight_decay=0.0, total_steps=None, variant="reference"),
    dict(weight_decay=0.1, total_steps=None, variant="reference"),
    dict(weight_decay=0.0, total_steps=60, variant="reference"),
    dict(weight_decay=0.1, total_steps=60, variant="reference"),
    dict(weight_decay=0.1, total_steps=60, variant="clean"),
    dict(weight_decay=0.0, total_steps=None, variant="clean", lr=3e-3, gamma1=0.8, gamma2=0.95, gamma3=0.99),
]


@pytest.mark.parametrize("kwargs", STABLE_CASES)
def test_stable_spam_matches_float64_model(kwargs):
    steps, seed = 80, 3
    cfg = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, gamma1=0.7, gamma2=0.9, gamma3=0.999, reset_interval=25,
               eta_min=0.5)
    cfg.update(kwargs)
    stream = gradient_stream(steps, seed)
    history = run_optimizer(StableSPAM, stream, seed, **cfg)
    model = StableSpamModel(initial_params(seed), **cfg)
    for k, grads in enumerate(stream):
        model.step(grads)
        for got, want in zip(history[k], model.p, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=f"step {k + 1}")
    assert model.k // cfg["reset_interval"] >= 3
    assert model.adaclipped > 0, "the stream must trigger AdaClip"


def test_variants_differ_after_a_reset():
    stream = gradient_stream(30, 4)
    ref = run_optimizer(StableSPAM, stream, 4, reset_interval=10)
    clean = run_optimizer(StableSPAM, stream, 4, reset_interval=10, variant="clean")
    for k in range(9):
        for a, b in zip(ref[k], clean[k], strict=True):
            assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ref[9], clean[9], strict=True))
