"""The fused (Triton) SPAM and Stable-SPAM steps: the same results as the foreach path, and how the path is chosen.

The numerical checks need triton: on a CUDA device they run the compiled kernels, without one they run the kernels
in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is first imported). Without
triton they are skipped; the selection tests run everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

import optimizers
from optimizers import SPAM, StableSPAM, fused

torch.set_num_threads(1)
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None  # without CUDA, tests/conftest.py sets TRITON_INTERPRET
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON or (not HAS_CUDA and not fused.interpret_mode()),
                                  reason="needs triton (on CUDA, or its CPU interpreter)")

SHAPES: tuple[tuple[int, ...], ...] = ((33, 21), (300,), (2049,))
CASES = [
    ("spam", {"reset_interval": 25, "warmup_steps": 8, "weight_decay": 0.1}),
    ("spam", {"reset_interval": 25, "warmup_steps": 8, "density": 0.5}),
    ("stable_spam", {"reset_interval": 20, "total_steps": 40, "weight_decay": 0.1}),
    ("stable_spam", {"reset_interval": 20, "variant": "clean"}),
    ("adam+moret+adagn+adaclip", {"reset_interval": 20}),
    ("adamw+moret+adaclip", {"reset_interval": 20, "weight_decay": 0.1}),
    ("adamw+adagn", {"weight_decay": 0.1}),
]


# --- numerical agreement with the foreach path -----------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, "param"), (torch.bfloat16, "param"),
                                               (torch.bfloat16, "float32")], ids=["fp32", "bf16", "bf16-fp32"])
@pytest.mark.slow
def test_fused_matches_foreach(name, hp, dtype, state_dtype):
    # 47 steps: two resets (at 20/40 or 25), spike clipping active after step 20 (SPAM); every step from the foreach
    # path's state, each within the bound that rounding in the compute dtype allows (`fused.step_tolerance`).
    errors = fused.compare_paths(optimizers.build, name, {**hp, "state_dtype": state_dtype}, DEVICE, dtype, steps=47,
                                 shapes=SHAPES)
    assert errors["grad_changed"] == 0.0, "the fused step changed p.grad"
    compute = torch.float32 if state_dtype == "float32" else dtype
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert errors[key] < fused.step_tolerance(compute, key), f"{key}: relative error {errors[key]:.2e}"


def _trajectory(fused_flags: list[bool], steps: int, switch_at: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_(True) for s in SHAPES]
    groups = [{"params": params[:2]}, {"params": params[2:]}]  # two groups: the fused path merges them
    opt = StableSPAM(groups, lr=1e-3, reset_interval=10, fused=fused_flags[0])
    for k in range(steps):
        if k == switch_at:
            state = opt.state_dict()
            opt = StableSPAM(groups, lr=1e-3, reset_interval=10, fused=fused_flags[1])
            opt.load_state_dict(state)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        opt.step()
    return [p.detach().cpu() for p in params]


@needs_triton
def test_checkpoint_moves_between_paths():
    ref = _trajectory([False, False], 24, switch_at=13)
    for flags in ([True, False], [False, True], [True, True]):  # a resumed fused step: load_state_dict adds keys
        got = _trajectory(flags, 24, switch_at=13)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
def test_fused_path_keeps_the_state_layout():
    states = []
    for flag in (True, False):
        p = torch.randn(40, device=DEVICE, requires_grad=True)
        opt = SPAM([p], reset_interval=5, warmup_steps=2, fused=flag)
        for _ in range(7):
            p.grad = torch.randn(40, device=DEVICE)
            opt.step()
        states.append(opt.state_dict())
    a, b = states
    assert a["param_groups"] == b["param_groups"]
    assert {k: type(v) for k, v in a["state"][0].items()} == {k: type(v) for k, v in b["state"][0].items()}
    assert a["state"][0]["step"] == b["state"][0]["step"] == 7


# --- selection -------------------------------------------------------------------------------------------------------


def _params(device: str = "cpu") -> list[torch.Tensor]:
    return [torch.zeros(4, 3, device=device, requires_grad=True)]


@pytest.mark.parametrize("name", ["spam", "stable_spam", "adam+moret+adagn+adaclip"])
def test_cpu_tensors_take_the_foreach_path_by_default(name):
    opt = optimizers.build(name, _params())
    resolved = optimizers.resolved_hparams(opt)
    assert resolved["fused"] is None
    assert resolved["fused_active"] is False
    assert "CUDA" in resolved["fused_reason"]


def test_fused_false_is_reported():
    resolved = optimizers.resolved_hparams(optimizers.build("spam", _params(), fused=False))
    assert resolved["fused"] is False and resolved["fused_active"] is False
    assert resolved["fused_reason"] == "disabled (fused=False)"


@pytest.mark.skipif(HAS_TRITON, reason="checks the message without triton")
@pytest.mark.parametrize("cls", [SPAM, StableSPAM])
def test_fused_true_without_triton_says_why(cls):
    with pytest.raises(ValueError, match="fused=True is not possible: triton is not importable"):
        cls(_params(), fused=True)


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA or fused.interpret_mode(), reason="checks CPU tensors without "
                    "the interpreter")
def test_fused_true_on_cpu_without_interpreter_says_why():
    with pytest.raises(ValueError, match="CUDA"):
        SPAM(_params(), fused=True)


@pytest.mark.parametrize("name,hp,why", [
    ("adam+moret+gradclip+adaclip", {}, "no fused step for components"),
    ("adamw+moret+spikeclip", {"adam_form": "spam", "moret_mode": "stable_spam"}, "moret_mode='spam'"),
    ("adamw+moret+adagn+adaclip", {"warmup_steps": 5}, "warmup"),
    ("adam+moret+adagn+adaclip", {"weight_decay": 0.1}, "decoupled weight decay"),
])
def test_unsupported_configurations_say_why(name, hp, why):
    with pytest.raises(ValueError, match=why):
        optimizers.build(name, _params(), fused=True, **hp)
    resolved = optimizers.resolved_hparams(optimizers.build(name, _params(), **hp))
    assert resolved["fused_active"] is False and why in resolved["fused_reason"]


def test_supported_configurations_are_recognised():
    assert fused.config_kind(SPAM(_params()))[0] == "spam"
    assert fused.config_kind(StableSPAM(_params(), variant="clean"))[0] == "stable_spam"
    composite = optimizers.build("adamw+moret+spikeclip", _params(), adam_form="spam", moret_mode="spam")
    assert fused.config_kind(composite)[0] == "spam"
    for name in ("adam+moret+adagn+adaclip", "adamw+adaclip", "adamw+moret+adagn", "adamw+moret"):
        assert fused.config_kind(optimizers.build(name, _params()))[0] == "stable_spam"


def test_invalid_fused_value():
    with pytest.raises(ValueError, match="fused must be"):
        SPAM(_params(), fused="yes")  # type: ignore[arg-type]


def test_auto_select_is_one_switch(monkeypatch):
    """AUTO_SELECT decides fused=None for the in-house steps and torch's Adam/AdamW alike; CPU tensors never take it."""
    for on in (False, True):
        monkeypatch.setattr(fused, "AUTO_SELECT", on)
        resolved = optimizers.resolved_hparams(optimizers.build("stable_spam", _params()))
        assert resolved["fused_active"] is False and resolved["kernel"] == "foreach"
        assert ("CUDA" in resolved["fused_reason"]) is True
        adamw = optimizers.build("adamw", _params())
        assert adamw.param_groups[0]["fused"] is None
        assert optimizers.resolved_hparams(adamw)["kernel"] == "torch-for-loop"
        assert fused.torch_adam_fused(adamw.param_groups) is False


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("on", [False, True])
def test_auto_select_on_cuda(monkeypatch, on):
    monkeypatch.setattr(fused, "AUTO_SELECT", on)
    resolved = optimizers.resolved_hparams(optimizers.build("stable_spam", _params("cuda")))
    assert resolved["fused_active"] is on and resolved["kernel"] == ("triton" if on else "foreach")
    adamw = optimizers.resolved_hparams(optimizers.build("adamw", _params("cuda")))
    assert adamw["kernel"] == ("torch-fused" if on else "torch-foreach")


@needs_triton
def test_requested_fused_step_is_recorded():
    resolved = optimizers.resolved_hparams(StableSPAM([torch.zeros(3, device=DEVICE, requires_grad=True)], fused=True))
    assert resolved["fused_active"] is True and resolved["kernel"] == "triton"


class _Counting:
    """The kernels module with every launch counted."""

    def __init__(self, module):
        self.module, self.launches = module, 0

    def __getattr__(self, name):
        kernel = getattr(self.module, name)
        if not name.endswith("_kernel"):
            return kernel
        outer = self

        class Launcher:
            def __getitem__(self, grid):
                outer.launches += 1
                return kernel[grid]

        return Launcher()


@needs_triton
@pytest.mark.parametrize("name,launches", [("spam", 1), ("stable_spam", 5), ("adamw+adaclip", 3), ("adamw+adagn", 3),
                                           ("adamw+moret", 1)])
def test_launches_do_not_grow_with_the_number_of_tensors(monkeypatch, name, launches):
    counts = []
    for n_tensors in (2, 9):
        counting = _Counting(importlib.import_module("optimizers._triton_kernels"))
        monkeypatch.setattr(fused, "_kernels", counting)
        params = [torch.randn(5 + i, device=DEVICE, requires_grad=True) for i in range(n_tensors)]
        opt = optimizers.build(name, params, fused=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        counts.append(counting.launches)
    assert counts == [launches, launches]


@needs_triton
@pytest.mark.parametrize("name,launches", [("spam", 1), ("stable_spam", 5)])
def test_groups_with_the_same_hyperparameters_share_launches(monkeypatch, name, launches):
    """Param groups that differ only in keys the optimizer does not read share one bucket; a group with another
    weight decay gets launches of its own. Either way the step matches the foreach path."""
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(5 + i, generator=gen) for i in range(6)]
    grads = [[torch.randn_like(x) for x in init] for _ in range(3)]
    for other_wd, want in ((0.1, launches), (0.0, 2 * launches)):
        counting = _Counting(importlib.import_module("optimizers._triton_kernels"))
        monkeypatch.setattr(fused, "_kernels", counting)
        runs = []
        for flag in (True, False):
            params = [x.to(DEVICE).requires_grad_(True) for x in init]
            groups = [{"params": params[:3], "role": "matrix"},
                      {"params": params[3:], "role": "other", "weight_decay": other_wd}]
            opt = optimizers.build(name, groups, fused=flag, weight_decay=0.1)
            for gs in grads:
                for p, g in zip(params, gs, strict=True):
                    p.grad = g.to(DEVICE)
                opt.step()
            runs.append(params)
        assert counting.launches == 3 * want
        for a, b in zip(*runs, strict=True):
            torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)


@needs_triton
def test_tensors_with_different_counters_match_foreach():
    """A parameter that misses gradients falls behind in its counters; the fused step splits the bucket by them."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(12)]
    runs = []
    for flag in (True, False):
        params = [x.to(DEVICE).requires_grad_(True) for x in init]
        opt = StableSPAM(params, reset_interval=5, fused=flag)
        for k, gs in enumerate(grads):
            for i, (p, g) in enumerate(zip(params, gs, strict=True)):
                p.grad = None if i == 1 and k % 3 == 0 else g.to(DEVICE)
            opt.step()
        runs.append(params)
    assert {opt.state[p]["step"] for p in runs[1]} != {opt.state[runs[1][0]]["step"]}
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)


# --- against the float64 models of the spec --------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("cls,kwargs", [
    (SPAM, {"weight_decay": 0.1, "eps": 1e-6, "warmup_steps": 10, "threshold": 5000.0}),
    (StableSPAM, {"weight_decay": 0.1, "total_steps": 60, "variant": "reference"}),
    (StableSPAM, {"weight_decay": 0.0, "variant": "clean", "gamma1": 0.8, "gamma2": 0.95, "gamma3": 0.99}),
], ids=["spam", "stable_spam", "stable_spam-clean"])
def test_fused_float32_follows_the_float64_model(cls, kwargs):
    """80 steps (three resets, spikes, zero gradients) in float32 on the fused path stay on the float64 model's
    trajectory to float32 accuracy."""
    from tests.optimizers.test_opt_reference_models import (
        SpamModel,
        StableSpamModel,
        gradient_stream,
        initial_params,
    )

    steps, seed = 80, 3
    cfg = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "reset_interval": 25, **kwargs}
    stream = gradient_stream(steps, seed)
    params = [p.float().to(DEVICE).requires_grad_(True) for p in initial_params(seed)]
    opt = cls(params, fused=True, **cfg)
    if cls is SPAM:
        model = SpamModel(initial_params(seed), **cfg)
    else:
        cfg = {"gamma1": 0.7, "gamma2": 0.9, "gamma3": 0.999, "total_steps": None, "eta_min": 0.5, **cfg}
        model = StableSpamModel(initial_params(seed), **cfg)
    for k, grads in enumerate(stream):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.float().to(DEVICE)
        opt.step()
        model.step(grads)
        for got, want in zip(params, model.p, strict=True):
            torch.testing.assert_close(got.detach().cpu().double(), want, rtol=1e-5, atol=1e-6, msg=f"step {k + 1}")
    assert optimizers.resolved_hparams(opt)["kernel"] == "triton"


@needs_triton
def test_unaligned_tensors_take_the_foreach_path_in_the_same_step():
    """A parameter that starts 4 bytes into its storage is not 16-byte aligned: foreach for it, fused for the rest."""
    gen = torch.Generator().manual_seed(6)
    storage = torch.randn(301, generator=gen)
    grads = [[torch.randn(300, generator=gen), torch.randn(40, generator=gen)] for _ in range(6)]
    runs = []
    for flag in (True, False):
        params = [storage.to(DEVICE, copy=True)[1:].requires_grad_(True),
                  torch.ones(40, device=DEVICE, requires_grad=True)]
        assert params[0].data_ptr() % fused.ALIGN != 0
        opt = StableSPAM(params, reset_interval=4, fused=flag)
        for gs in grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.to(DEVICE)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)



ROW = 0  # set below: entries per row of the coarse table of the gradient reductions
LARGE_SHAPES: tuple[tuple[int, ...], ...] = ()
if HAS_TRITON:
    ROW = fused.BLOCK * fused.REDUCE_BLOCKS
    LARGE_SHAPES = ((2 * ROW + 3 * fused.BLOCK + 5,), (300,))  # two full rows, a partial one; a small tensor


@needs_triton
@pytest.mark.parametrize("name,hp", [("stable_spam", {"reset_interval": 6}), ("adamw+adagn", {}),
                                     ("adamw+adaclip", {})], ids=["stable_spam", "adagn", "adaclip"])
def test_large_bfloat16_tensors_match_foreach(name, hp):
    """Tensors spanning several rows of the reductions' coarse table (rows read unrolled and unmasked, a last partial
    row), spikes included: within the one-step bounds of `fused.step_tolerance`. (In float32 a norm over 40,000
    entries with a spike, summed in another order, already parts the paths by more than the 1e-6 floor, before this
    layout as after; `test_clipped_norm_rereads_only_the_rows_it_must` follows a float32 trajectory instead.)"""
    errors = fused.compare_paths(optimizers.build, name, hp, DEVICE, torch.bfloat16, steps=10, shapes=LARGE_SHAPES)
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert errors[key] < fused.step_tolerance(torch.bfloat16, key), f"{key}: relative error {errors[key]:.2e}"


@needs_triton
def test_clipped_norm_rereads_only_the_rows_it_must():
    """The norm of the clipped gradient comes from one read of the gradient plus a second read of only the rows holding
    entries above the floor of AdaClip's threshold: on the spike's step, the spike's row alone (the rest of the large
    tensor is quiet; the small tensor's gradients shrink)."""
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen) for s in LARGE_SHAPES]
    grads = []
    for k in range(10):
        gs = [torch.randn(s, generator=gen) for s in LARGE_SHAPES]
        gs[0][ROW:] *= 0.01
        gs[1] *= 0.5**k
        if k == 9:
            gs[0][17] = 50.0
        grads.append([g.to(DEVICE) for g in gs])
    runs = []
    for flag in (True, False):
        params = [x.to(DEVICE).requires_grad_(True) for x in init]
        opt = StableSPAM(params, lr=1e-3, fused=flag)
        for gs in grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
    (plan,) = runs[0][1]._fused_plans.values()
    assert plan.flags.tolist() == [1, 0, 0, 0]  # the spike's row, the quiet rows of tensor 0, tensor 1
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)


# --- the partition kept between steps --------------------------------------------------------------------------------


def _changing_run(name: str, flag: bool, counting: _Counting | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Eight steps through everything the kept partition must notice: a group's weight decay changes (the merged
    launch splits), the state is reloaded into the same optimizer, a tensor goes without a gradient, gradients are
    new tensors or the same ones again."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(5 + 3 * i, generator=gen).to(DEVICE).requires_grad_(True) for i in range(5)]
    groups = [{"params": params[:3]}, {"params": params[3:]}]
    opt = optimizers.build(name, groups, fused=flag, weight_decay=0.1)
    launches = []
    for k in range(8):  # odd steps keep the gradient tensors: only the change itself can tell the partition
        if k == 3:
            opt.param_groups[1]["weight_decay"] = 0.0
        if k in (5, 7):  # the second load changes nothing else (the first adds keys to the defaults)
            opt.load_state_dict(opt.state_dict())
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).to(DEVICE)
            if k == 4 and i == 1:
                p.grad = None
            elif k % 2 and p.grad is not None:
                p.grad.copy_(g)  # the same tensor again
            else:
                p.grad = g
        opt.step()
        launches.append(counting.launches if counting else 0)
    steps = [torch.tensor(float(opt.state[p]["step"])) for p in params]  # the optimizer's own state, not a copy
    return [p.detach().cpu() for p in params] + steps, launches


@needs_triton
@pytest.mark.parametrize("name,launches", [("spam", 1), ("stable_spam", 5)])
def test_kept_partition_follows_what_changes_between_steps(monkeypatch, name, launches):
    counting = _Counting(importlib.import_module("optimizers._triton_kernels"))
    monkeypatch.setattr(fused, "_kernels", counting)
    got, counts = _changing_run(name, True, counting)
    want, _ = _changing_run(name, False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    per_step = [b - a for a, b in zip([0, *counts], counts, strict=False)]
    # merged, then split by the weight decay, then also by counters: the tensor without a gradient at step 4 fell behind
    assert per_step == [launches] * 3 + [2 * launches] * 2 + [3 * launches] * 3


@needs_triton
def test_kept_partition_does_not_hold_gradients():
    import weakref

    p = torch.randn(40, device=DEVICE, requires_grad=True)
    opt = SPAM([p], fused=True)
    p.grad = torch.randn(40, device=DEVICE)
    ref = weakref.ref(p.grad)
    opt.step()
    p.grad = None
    assert ref() is None


def _nonfinite_run(name: str, flag: bool, hp: dict) -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_(True) for s in SHAPES]
    opt = optimizers.build(name, params, lr=1e-3, fused=flag, **hp)
    for k in range(30):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        if k == 24:  # past SPAM's clip warm-up: a NaN entry in one tensor, an infinite one in another
            params[0].grad.view(-1)[3] = float("nan")
            params[2].grad.view(-1)[7] = float("inf")
        opt.step()
    return [p.detach().cpu() for p in params], [{k: v.cpu() for k, v in opt.state[p].items()
                                                  if isinstance(v, torch.Tensor)} for p in params]


@needs_triton
@pytest.mark.parametrize("name,hp", [("spam", {"reset_interval": 100, "warmup_steps": 8}),
                                     ("stable_spam", {"reset_interval": 100})], ids=["spam", "stable_spam"])
def test_non_finite_gradients_reach_the_weights_as_on_the_foreach_path(name, hp):
    """A NaN gradient entry is not a spike to clip: both paths carry it into the weights and states (SPAM's clip
    compares g^2 with threshold * v, which a NaN fails; Triton's min and max drop a NaN unless told not to). An
    infinite entry leaves the same entries non-finite on both paths (NaN on one, inf on the other in Stable-SPAM's
    norm statistics, where the foreach path's arithmetic meets inf - inf)."""
    (ref, ref_state), (got, got_state) = (_nonfinite_run(name, flag, hp) for flag in (False, True))
    assert torch.isnan(ref[0]).any()  # the reference does not hide it
    pairs = [(a, b, "param") for a, b in zip(got, ref, strict=True)]
    pairs += [(sa[key], sb[key], key) for sa, sb in zip(got_state, ref_state, strict=True) for key in sb]
    for a, b, key in pairs:
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), key
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-6, msg=key)
