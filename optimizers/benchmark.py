"""Step-time benchmark of optimizers on the parameter set of a LLaMA model of the papers' sizes.

Only tensors are created (no model, no forward pass): the parameters of LLaMA-60M ... 1B with random gradients, in
the papers' two groups. Each optimizer runs a few warm-up steps and is then timed over ``--steps`` steps (CUDA events
on a GPU). Besides registry names, ``torch_adamw_fused`` and ``torch_adamw_foreach`` time torch's AdamW kernels.

    python -m optimizers.benchmark --size 1b --device cuda --names torch_adamw_fused,spam,stable_spam

Results are logged (one line per optimizer: ms per step and the ratio to the first name) and, with ``--json``, saved.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from .registry import build, spec

__all__ = ["LLAMA_SIZES", "llama_shapes", "main", "time_optimizer"]

log = logging.getLogger(__name__)

# vocab, hidden, intermediate, layers (DESIGN.md, "Experiments").
LLAMA_SIZES: dict[str, tuple[int, int, int, int]] = {
    "60m": (32000, 512, 1376, 8),
    "130m": (32000, 768, 2048, 12),
    "350m": (32000, 1024, 2736, 24),
    "1b": (32000, 2048, 5461, 24),
}


def llama_shapes(size: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of every parameter of a LLaMA model (untied head, RMSNorm, SwiGLU)."""
    vocab, d, ff, layers = LLAMA_SIZES[size]
    shapes: list[tuple[str, tuple[int, ...], str]] = [("embed_tokens.weight", (vocab, d), "other")]
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"layers.{i}.self_attn.{proj}.weight", (d, d), "matrix"))
        shapes.append((f"layers.{i}.mlp.gate_proj.weight", (ff, d), "matrix"))
        shapes.append((f"layers.{i}.mlp.up_proj.weight", (ff, d), "matrix"))
        shapes.append((f"layers.{i}.mlp.down_proj.weight", (d, ff), "matrix"))
        shapes.append((f"layers.{i}.input_layernorm.weight", (d,), "other"))
        shapes.append((f"layers.{i}.post_attention_layernorm.weight", (d,), "other"))
    shapes.append(("norm.weight", (d,), "other"))
    shapes.append(("lm_head.weight", (vocab, d), "other"))
    return shapes


def _groups(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    by_role: dict[str, list[torch.Tensor]] = {"matrix": [], "other": []}
    for _, shape, role in llama_shapes(size):
        p = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)
        p.requires_grad_(True)
        p.grad = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 1e-3).to(dtype)
        by_role[role].append(p)
    return [{"params": ps, "role": role} for role, ps in by_role.items()]


def _make(name: str, groups: list[dict[str, Any]], hparams: dict[str, Any]) -> torch.optim.Optimizer:
    if name == "torch_adamw_fused":
        return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0, fused=True)
    if name == "torch_adamw_foreach":
        return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0, foreach=True)
    return build(name, groups, **hparams)


def time_optimizer(name: str, size: str, device: torch.device, dtype: torch.dtype, steps: int = 20,
                   warmup: int = 3, hparams: dict[str, Any] | None = None) -> float:
    """Milliseconds per `step()` of optimizer `name` on the parameters of LLaMA-`size`."""
    groups = _groups(size, device, dtype, seed=0)
    opt = _make(name, groups, dict(hparams or {}))
    for _ in range(warmup):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            opt.step()
        end.record()
        torch.cuda.synchronize(device)
        elapsed = start.elapsed_time(end) / steps
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        elapsed = (time.perf_counter() - t0) * 1e3 / steps
    del opt, groups
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="60m", choices=sorted(LLAMA_SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--names", default="torch_adamw_fused,torch_adamw_foreach,adamw,spam,stable_spam")
    parser.add_argument("--hparams", default="{}",
                        help="JSON object of hyperparameters, given to each registry name that accepts them")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    hparams = json.loads(args.hparams)
    results: dict[str, float] = {}
    for name in args.names.split(","):
        accepts = set() if name.startswith("torch_") else spec(name).accepts
        extra = {k: v for k, v in hparams.items() if k in accepts}
        if extra:
            log.info("%s: %s", name, extra)
        results[name] = time_optimizer(name, args.size, device, dtype, steps=args.steps, hparams=extra)
    first = next(iter(results.values()))
    for name, ms in results.items():
        log.info("%-28s %9.3f ms/step  %6.2fx", name, ms, ms / first)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "device": str(device), "dtype": args.dtype, "ms_per_step": results}, f,
                      indent=2)
    return results


if __name__ == "__main__":
    main()
