"""Step-time benchmark of optimizers on the parameter set of a LLaMA model of the papers' sizes.

Only tensors are created (no model, no forward pass): the parameters of LLaMA-60M ... 1B with random gradients, in
the papers' two groups. Each optimizer runs ``--warmup`` steps and is then timed step by step over ``--steps`` steps
(a pair of CUDA events around each step on a GPU); the median is reported, with min and max, and on a GPU the same
steps timed again queued ahead of the device, which separates the device's time from the host's. Besides registry names,
``torch_adamw_fused`` and ``torch_adamw_foreach`` time torch's AdamW kernels, and a registry name with the suffix
``_fused`` or ``_foreach`` (``spam_fused``, ``stable_spam_foreach``) forces that path of the in-house optimizers.

``--host-only`` replaces the fused steps' kernels by no-ops, so that on any device (the CPU included) only the Python
around them is timed: the host's share of a step, which bounds it at small sizes.

Also reported: the measured device-to-device copy bandwidth, the bytes each step must move at the least and the time
that takes at that bandwidth (the floor). ``--check`` first runs the fused path against the foreach path on the device
(float32 and bfloat16, random gradients with spikes, across momentum resets, each step from the same state) and logs
the relative errors against the bounds of `fused.step_tolerance`.

    python -m optimizers.benchmark --check --size 130m,1b --dtype float32,bfloat16 --device cuda \
        --names torch_adamw_fused,spam_foreach,spam_fused,stable_spam_foreach,stable_spam_fused --json bench.json

Results are logged (per size and dtype, one line per optimizer: ms per step and the ratio to the first name) and, with
``--json``, saved.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import fused as fused_steps
from .compose import compute_dtype
from .fused import STEP_ROUNDINGS, compare_paths, step_tolerance, triton_unavailable_reason
from .registry import build, resolved_hparams, spec

__all__ = ["LLAMA_SIZES", "check", "copy_bandwidth", "llama_shapes", "main", "split_name", "step_bytes",
           "time_optimizer"]

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


# GPU clock cycles of the sleep kernel that the queued timing puts ahead of the steps (about 1 s at 2 GHz).
SLEEP_CYCLES = 2_000_000_000

PATH_SUFFIXES: dict[str, bool] = {"_fused": True, "_foreach": False}


def split_name(name: str) -> tuple[str, bool | None]:
    """("spam", True) for ``spam_fused``, ("spam", False) for ``spam_foreach``, (name, None) otherwise."""
    for suffix, fused in PATH_SUFFIXES.items():
        if name.endswith(suffix) and not name.startswith("torch_"):
            return name[: -len(suffix)], fused
    return name, None


def _make(name: str, groups: list[dict[str, Any]], hparams: dict[str, Any]) -> torch.optim.Optimizer:
    if name == "torch_adamw_fused":
        return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0, fused=True)
    if name == "torch_adamw_foreach":
        return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0, foreach=True)
    base, fused = split_name(name)
    if fused is not None:
        hparams = {**hparams, "fused": fused}
    return build(base, groups, **hparams)


def _accepts(name: str) -> set[str]:
    return set() if name.startswith("torch_") else spec(split_name(name)[0]).accepts


def step_bytes(name: str, size: str, dtype: torch.dtype, state_dtype: str = "param") -> int | None:
    """Bytes one step must move at the least (each tensor read or written once per pass the algorithm needs).

    Adam-like updates read p, g, m, v and write p, m, v; Stable-SPAM reads g once more (max |g| and the norm of the
    clipped gradient, which the update needs before it can start, in one pass: `fused._stable_part`). None for names
    without a model here.
    """
    base = split_name(name)[0]
    extra_grad_reads = {"torch_adamw_fused": 0, "torch_adamw_foreach": 0, "adamw": 0, "adam": 0, "spam": 0,
                        "stable_spam": 1}.get(base)
    if extra_grad_reads is None:
        return None
    n = sum(math.prod(shape) for _, shape, _ in llama_shapes(size))
    p = torch.empty((), dtype=dtype).element_size()
    s = torch.empty((), dtype=compute_dtype(dtype, state_dtype)).element_size()
    return n * (2 * p + (1 + extra_grad_reads) * p + 4 * s)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read plus bytes written, median of `repeats`)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def _summary(times: list[float]) -> dict[str, Any]:
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def _timed_steps(opt: torch.optim.Optimizer, steps: int, device: torch.device,
                 queued: bool) -> tuple[list[float], list[float]]:
    """Milliseconds of each of `steps` steps between CUDA events, and the host's milliseconds in each `step()` call.

    Not queued, the device waits for the host wherever the host is slower, so the events time the step as a training
    loop sees it when nothing else is queued. Queued, the steps are enqueued behind a sleep kernel that lasts longer
    than the host takes to enqueue them all, so that no step waits for the host: the events time the device's work
    alone ([] when the host did not finish enqueueing before the sleep ended)."""
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    host: list[float] = []
    if queued:
        slept = torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        slept.record()
    for start, end in events:
        t0 = time.perf_counter()
        start.record()
        opt.step()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
    if queued and slept.query():  # the sleep ended before the host had enqueued every step
        torch.cuda.synchronize(device)
        return [], host
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events], host


class _NoKernels:
    """In place of the Triton kernels module: every launch returns at once, so only the host's Python is timed."""

    TL_DTYPES: dict[torch.dtype, None] = dict.fromkeys(fused_steps.DTYPES)

    def __getattr__(self, name: str) -> Any:
        return self

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernels_as_no_ops() -> Iterator[None]:
    """The fused steps run on any device with their kernels replaced by no-ops (`--host-only`); the dtype rule and
    every other condition of the fused step stay as they are."""
    saved = fused_steps._kernels, fused_steps.device_supported, fused_steps.triton_unavailable_reason
    fused_steps._kernels, fused_steps.device_supported = _NoKernels(), lambda device, forced: True
    fused_steps.triton_unavailable_reason = lambda: None
    try:
        yield
    finally:
        fused_steps._kernels, fused_steps.device_supported, fused_steps.triton_unavailable_reason = saved


def time_optimizer(name: str, size: str, device: torch.device, dtype: torch.dtype, steps: int = 50,
                   warmup: int = 25, hparams: dict[str, Any] | None = None) -> dict[str, Any]:
    """Milliseconds per `step()` of optimizer `name` on the parameters of LLaMA-`size`: the median over `steps`
    steps after `warmup` (CUDA events around each step on a GPU), with min and max, and the fused path's use. On a
    GPU also the device's time alone (`device_ms`, steps queued ahead of it) and the host's (`host_ms`): a step
    whose `ms` is near `host_ms` and well above `device_ms` is bound by the host (Python and kernel launches)."""
    groups = _groups(size, device, dtype, seed=0)
    opt = _make(name, groups, dict(hparams or {}))
    for _ in range(warmup):
        opt.step()
    out: dict[str, Any]
    if device.type == "cuda":
        times, host = _timed_steps(opt, steps, device, queued=False)
        out = _summary(times)
        device_times, _ = _timed_steps(opt, steps, device, queued=True)
        out["host_ms"] = statistics.median(host)
        out["device_ms"] = statistics.median(device_times) if device_times else None
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
        out = _summary(times)
    if not name.startswith("torch_"):
        resolved = resolved_hparams(opt)
        out["fused_active"] = resolved.get("fused_active")
    del opt, groups
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


CHECK_CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("spam", {"reset_interval": 25, "warmup_steps": 8, "weight_decay": 0.1}),
    ("spam", {"reset_interval": 25, "warmup_steps": 8, "density": 0.5}),
    ("stable_spam", {"reset_interval": 20, "total_steps": 60, "weight_decay": 0.1}),
    ("stable_spam", {"reset_interval": 20, "variant": "clean"}),
)
CHECK_DTYPES: tuple[tuple[str, torch.dtype, str], ...] = (
    ("float32", torch.float32, "param"),
    ("bfloat16", torch.bfloat16, "param"),
    ("bfloat16", torch.bfloat16, "float32"),
)


def check(device: torch.device, steps: int = 64) -> list[dict[str, Any]]:
    """Fused against foreach on `device` (random data with spikes, across resets): relative errors per case."""
    rows = []
    for dtype_name, dtype, state_dtype in CHECK_DTYPES:
        compute = compute_dtype(dtype, state_dtype)
        tol = {key: step_tolerance(compute, key) for key in STEP_ROUNDINGS}
        for name, hp in CHECK_CASES:
            errors = compare_paths(build, name, {**hp, "state_dtype": state_dtype}, device, dtype, steps=steps)
            ok = all(errors[key] < tol[key] for key in tol) and not errors["grad_changed"]
            rows.append({"name": name, "hparams": hp, "dtype": dtype_name, "state_dtype": state_dtype,
                         "tolerance": tol, "ok": ok, **errors})
            log.info("check %-12s %-9s state=%-8s %-62s param %.2e  m %.2e  v %.2e  %s", name, dtype_name, state_dtype,
                     json.dumps(hp), errors["param"], errors["exp_avg"], errors["exp_avg_sq"], "ok" if ok else "FAIL")
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench perf optimizers", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="60m", help=f"comma-separated, among {', '.join(LLAMA_SIZES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", help="comma-separated, among float32, bfloat16")
    parser.add_argument("--names", default="torch_adamw_fused,torch_adamw_foreach,adamw,spam,stable_spam")
    parser.add_argument("--hparams", default="{}",
                        help="JSON object of hyperparameters, given to each registry name that accepts them")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=25,
                        help="untimed steps first (25: past SPAM's first 20 steps without spike clipping)")
    parser.add_argument("--check", action="store_true",
                        help="first compare the fused and foreach paths numerically on the device")
    parser.add_argument("--host-only", action="store_true",
                        help="replace the fused steps' kernels by no-ops and time the Python around them (any device)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    sizes = args.size.split(",")
    dtypes = args.dtype.split(",")
    for size in sizes:
        if size not in LLAMA_SIZES:
            parser.error(f"unknown size {size!r}; valid sizes: {', '.join(LLAMA_SIZES)}")
    for dtype_name in dtypes:
        if dtype_name not in ("float32", "bfloat16"):
            parser.error(f"unknown dtype {dtype_name!r}; valid: float32, bfloat16")
    hparams = json.loads(args.hparams)
    command = " ".join(["bench perf optimizers", *(sys.argv[1:] if argv is None else argv)])
    report: dict[str, Any] = {"command": command, "device": str(device), "torch": torch.__version__,
                              "steps": args.steps, "warmup": args.warmup,
                              "host_only": args.host_only}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    report["triton"] = triton_unavailable_reason() or "available"

    def save() -> None:  # after every stage, so that a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)

    if args.check:
        report["check"] = check(device)
        log.info("check: %s", "all ok" if all(r["ok"] for r in report["check"]) else "FAILURES")
        save()
    bandwidth = copy_bandwidth(device)
    report["copy_bandwidth_GBps"] = bandwidth if bandwidth == bandwidth else None
    log.info("device-to-device copy bandwidth: %.0f GB/s (read + write)", bandwidth)
    runs: list[dict[str, Any]] = []
    report["runs"] = runs
    for size in sizes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            results: dict[str, dict[str, Any]] = {}
            for name in args.names.split(","):
                extra = {k: v for k, v in hparams.items() if k in _accepts(name)}
                if extra:
                    log.info("%s: %s", name, extra)
                with kernels_as_no_ops() if args.host_only else contextlib.nullcontext():
                    r = time_optimizer(name, size, device, dtype, steps=args.steps, warmup=args.warmup,
                                       hparams=extra)
                nbytes = step_bytes(name, size, dtype, extra.get("state_dtype", "param"))
                r["bytes"] = nbytes
                r["floor_ms"] = nbytes / (bandwidth * 1e9) * 1e3 if nbytes and bandwidth == bandwidth else None
                results[name] = r
            first = next(iter(results.values()))["ms"]
            log.info("LLaMA-%s %s (%s), median of %d steps:", size, dtype_name, device, args.steps)
            for name, r in results.items():
                r["ratio"] = r["ms"] / first
                floor = f"{r['floor_ms']:8.3f}" if r["floor_ms"] is not None else "       -"
                split = (f"; device {r['device_ms']:.3f}, host {r['host_ms']:.3f}"
                         if r.get("device_ms") is not None else "")
                log.info("  %-24s %9.3f ms/step  %6.2fx  (min %.3f, max %.3f; floor %s ms%s; fused %s)", name,
                         r["ms"], r["ratio"], r["ms_min"], r["ms_max"], floor, split, r.get("fused_active", "-"))
            runs.append({"size": size, "dtype": dtype_name, "results": results})
            save()
    return report


if __name__ == "__main__":
    main()
