"""The optimizers on a CUDA device: same results as on the CPU, no host syncs inside step(). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import optimizers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(64, 48), (48,), (4, 8, 16)]
CASES = [
    ("spam", {"reset_interval": 30, "warmup_steps": 10, "weight_decay": 0.1}),
    ("stable_spam", {"reset_interval": 25, "total_steps": 60, "weight_decay": 0.1}),
    ("stable_spam", {"reset_interval": 25, "variant": "clean"}),
    ("adam+moret+gradclip+adaclip", {"reset_interval": 25}),
    ("adamw+moret+adagn+spikeclip", {"reset_interval": 25, "weight_decay": 0.1}),
]


def stream(steps: int, device: str, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for k in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        if k % 7 == 3:
            grads[0][1, 2] *= 1000.0
        out.append([g.to(device=device, dtype=dtype) for g in grads])
    return out


def run(name: str, hp: dict, device: str, dtype: torch.dtype, steps: int = 80, sync_check: bool = False):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(True)
              for s in SHAPES]
    opt = optimizers.build(name, params, **hp)
    grads = stream(steps, device, dtype)
    torch.cuda.synchronize()
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [p.detach().cpu() for p in params], opt


@pytest.mark.parametrize("name,hp", CASES)
def test_cuda_matches_cpu_in_float64(name, hp):
    cpu, _ = run(name, hp, "cpu", torch.float64)
    cuda, _ = run(name, hp, "cuda", torch.float64)
    for a, b in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,hp", [*CASES, ("spam", {"density": 0.5, "reset_interval": 30, "warmup_steps": 10}),
                                     ("stable_spam", {"state_dtype": "float32", "reset_interval": 25})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_host_sync_in_step_on_cuda(name, hp, dtype):
    params, opt = run(name, hp, "cuda", dtype, steps=70, sync_check=True)
    assert all(torch.isfinite(p.float()).all() for p in params)


def test_spike_monitor_on_cuda_without_sync():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).cuda()
    monitor = optimizers.SpikeMonitor(model)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(5):
            for p in model.parameters():
                p.grad = torch.ones_like(p) * (100.0 if k == 4 else 1.0)
            monitor.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert monitor.summary()["spikes/total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,hp", [CASES[0], CASES[1], CASES[2],
                                     ("stable_spam", {"state_dtype": "float32", "reset_interval": 25})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_step_has_no_host_sync(name, hp, dtype):
    """New gradient tensors every step: their address table goes to the device without a sync."""
    params, opt = run(name, {**hp, "fused": True}, "cuda", dtype, steps=70, sync_check=True)
    assert optimizers.resolved_hparams(opt)["kernel"] == "triton"
    assert all(torch.isfinite(p.float()).all() for p in params)
