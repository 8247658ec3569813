"""Where a mini LLaMA training step's time goes on one GPU: host against kernels, alone and with processes sharing it.

A small model's compiled step can be host-bound (the GPU waits for Python and kernel launches), so packing more trials
on a GPU or replaying each step as CUDA graphs may pay more than faster kernels. This probe separates the two on
random tokens (the data pipeline left out), the mini preset's shape and batch (32 x 256 tokens, vocabulary 8192):

    python -m tasks.llm_pretrain.step_probe one --mode default --optimizer stable_spam --steps 200
    python -m tasks.llm_pretrain.step_probe many --processes 10 --mode reduce-overhead --steps 150

``one`` times `--steps` steps after a warm-up (tokens/s, milliseconds a step) and profiles ten more: kernels a step
and their summed device time, the floor the host could reach. ``many`` starts that many processes, each warming up
alone, then times them together from a common start: their summed tokens/s is what the GPU gives trials that share it.
`--mode`: eager, or a torch.compile mode (default, reduce-overhead = CUDA graphs). CUDA only. The training loop's own
throughput, data and evaluation included, is `tasks.llm_pretrain.throughput`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

BATCH, SEQ, VOCAB = 32, 256, 8192  # the mini preset (tasks/llm_pretrain/config.py) at the GPU runs' vocabulary
WARMUP = 15
MODES = ("eager", "default", "reduce-overhead")


def make_step(mode: str, optimizer: str) -> Callable[[int], torch.Tensor]:
    """One training step of the mini LLaMA in bf16 on random tokens (eight batches in turn) with `optimizer`, run
    `WARMUP` times (compilation, graph capture) before it is returned."""
    import optimizers
    from tasks.llm_pretrain.model import build_llama, llama_config
    from tasks.llm_pretrain.task import CausalLMLoss, GraphSteps

    torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    model = build_llama(llama_config("mini", VOCAB, SEQ, 0), "cuda").to(torch.bfloat16)
    loss_fn: Any = CausalLMLoss(model)
    if mode == "reduce-overhead":
        loss_fn = GraphSteps(torch.compile(loss_fn, mode=mode))  # as the training loop replays CUDA graphs
    elif mode == "default":
        loss_fn = torch.compile(loss_fn)
    opt = optimizers.build(optimizer, model, lr=1e-3)
    ids = torch.randint(0, VOCAB, (8, BATCH, SEQ)).pin_memory()
    targets = torch.cat([ids[:, :, 1:], torch.full((8, BATCH, 1), -100)], 2).pin_memory()

    def step(i: int) -> torch.Tensor:
        loss = loss_fn(ids[i % 8].cuda(non_blocking=True), targets[i % 8].cuda(non_blocking=True)) / (BATCH * SEQ)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()

    for i in range(WARMUP):
        step(i)
    torch.cuda.synchronize()
    return step


def timed(step: Callable[[int], torch.Tensor], steps: int) -> tuple[float, float]:
    """(tokens/s, mean loss) over `steps` steps, synchronised at both ends."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    total = torch.zeros((), device="cuda")
    for i in range(steps):
        total += step(i)
    torch.cuda.synchronize()
    return BATCH * SEQ * steps / (time.perf_counter() - started), float(total) / steps


def one(mode: str, optimizer: str, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    started = time.perf_counter()
    step = make_step(mode, optimizer)
    warmup_s = time.perf_counter() - started
    rate, loss = timed(step, steps)
    profiled = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(profiled):
            step(i)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name[:60]] = by_name.get(e.name[:60], 0.0) + e.device_time / profiled
    return {"mode": mode, "opt": optimizer, "tokens_per_s": rate, "ms_per_step": BATCH * SEQ / rate * 1e3,
            "kernels_per_step": len(kernels) / profiled,
            "kernel_ms_per_step": sum(e.device_time for e in kernels) / profiled / 1e3, "warmup_s": warmup_s,
            "loss": loss, "top_kernels_us": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:12])}


def worker(mode: str, optimizer: str, steps: int, barrier: str, processes: int, me: int) -> dict[str, Any]:
    step = make_step(mode, optimizer)
    open(os.path.join(barrier, f"ready{me}"), "w").close()
    while len(os.listdir(barrier)) < processes:
        time.sleep(0.05)
    started = time.time()
    rate, _ = timed(step, steps)
    return {"me": me, "start": started, "end": time.time(), "tokens_per_s": rate}


def many(processes: int, mode: str, optimizer: str, steps: int) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as barrier:
        procs = [subprocess.Popen([sys.executable, "-m", __spec__.name if __spec__ else __name__, "worker",
                                   "--mode", mode, "--optimizer", optimizer, "--steps", str(steps),
                                   "--barrier", barrier, "--processes", str(processes), "--me", str(i)],
                                  stdout=subprocess.PIPE, text=True) for i in range(processes)]
        rows = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    return {"processes": processes, "mode": mode, "opt": optimizer,
            "aggregate_tokens_per_s": processes * steps * BATCH * SEQ / span,
            "mean_per_process": sum(r["tokens_per_s"] for r in rows) / processes, "span_s": span,
            "total_s": time.perf_counter() - started}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m tasks.llm_pretrain.step_probe",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("one", "many", "worker"))
    parser.add_argument("--mode", choices=MODES, default="default")
    parser.add_argument("--optimizer", default="stable_spam", help="an optimizer registry name")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--processes", type=int, default=10, help="`many`: processes sharing the GPU")
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--me", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "step_probe measures a CUDA GPU and none is visible here\n")
    if args.what == "one":
        out = one(args.mode, args.optimizer, args.steps)
    elif args.what == "many":
        out = many(args.processes, args.mode, args.optimizer, args.steps)
    else:
        out = worker(args.mode, args.optimizer, args.steps, args.barrier, args.processes, args.me)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
