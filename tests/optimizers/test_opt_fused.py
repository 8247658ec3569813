"""The fused (Triton) SPAM and Stable-SPAM steps: the same results as the foreach path, and how the path is chosen.

The numerical checks need triton: on a CUDA device they run the compiled kernels, without one they run the kernels
in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is first imported). Without
triton they are skipped; the selection tests run everywhere.
"""

from __future__ import annotations

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
]


# --- numerical agreement with the foreach path -----------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("dtype,state_dtype,tol",
                         [(torch.float32, "param", 1e-6), (torch.bfloat16, "param", 1e-2),
                          (torch.bfloat16, "float32", 1e-2)], ids=["fp32", "bf16", "bf16-fp32"])
@pytest.mark.slow
def test_fused_matches_foreach(name, hp, dtype, state_dtype, tol):
    # 47 steps: two resets (at 20/40 or 25), spike clipping active after step 20 (SPAM), moments compared mid-period.
    errors = fused.compare_paths(optimizers.build, name, {**hp, "state_dtype": state_dtype}, DEVICE, dtype, steps=47,
                                 shapes=SHAPES)
    assert errors["grad_changed"] == 0.0, "the fused step changed p.grad"
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert errors[key] < tol, f"{key}: relative error {errors[key]:.2e}"


def _trajectory(fused_flags: list[bool], steps: int, switch_at: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_(True) for s in SHAPES]
    opt = StableSPAM(params, lr=1e-3, reset_interval=10, fused=fused_flags[0])
    for k in range(steps):
        if k == switch_at:
            state = opt.state_dict()
            opt = StableSPAM(params, lr=1e-3, reset_interval=10, fused=fused_flags[1])
            opt.load_state_dict(state)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        opt.step()
    return [p.detach().cpu() for p in params]


@needs_triton
def test_checkpoint_moves_between_paths():
    ref = _trajectory([False, False], 24, switch_at=13)
    for flags in ([True, False], [False, True]):
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
    assert fused.config_kind(optimizers.build("adam+moret+adagn+adaclip", _params()))[0] == "stable_spam"


def test_invalid_fused_value():
    with pytest.raises(ValueError, match="fused must be"):
        SPAM(_params(), fused="yes")  # type: ignore[arg-type]
