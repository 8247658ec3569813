"""Where a fine-tuning trial's GPU time goes: training steps and scoring, alone and with processes sharing the GPU.

A 135M-parameter model trained on 16 short examples a step runs thousands of small kernels, so trials sharing a GPU
may be bound by how their kernels share it rather than by arithmetic. This probe times a `mini` (LoRA) or
`mini-full` trial's own training steps and evaluation on its real model and data:

    python -m tasks.finetune.step_probe one --preset mini --steps 40
    python -m tasks.finetune.step_probe many --processes 6 --preset mini --steps 60 --eval-batch 64,256

``one`` times `--steps` steps after a warm-up and profiles five more (kernels a step, their summed device time and
the kernels that take the most of it, by name).
``many`` starts that many processes, each building its trial and warming up alone; they then time `--steps` training
steps together from a common start, and one scoring pass over the evaluation examples per `--eval-batch` size, again
from a common start: the summed rates are what the GPU gives trials that share it. `--compile on|off` overrides the
preset's `compile` (its decoder layers compiled, `tasks.finetune.model.compile_layers`); warm-up steps include the
compilation. CUDA only; the scores themselves are not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

WARMUP = 5
TOP_KERNELS = 12  # `one`: the kernels that take the most device time, by name


def make_trial(preset: str, optimizer: str, seed: int, compile_model: bool | None) -> Any:
    """The preset's trial on the GPU (`compile_model` None: as the preset compiles), warmed up by `WARMUP` steps."""
    from tasks.finetune.task import FinetuneTask
    from tasks.finetune.training import FinetuneTrial

    cfg = FinetuneTask().config(preset, {} if compile_model is None else {"compile": compile_model})
    trial = FinetuneTrial.create(cfg, optimizer, {}, seed=seed, device="cuda")
    for _ in range(WARMUP):
        trial.train_step()
    torch.cuda.synchronize()
    return trial


def train_rate(trial: Any, steps: int) -> tuple[float, float, float]:
    """(examples/s, start, end) over `steps` training steps."""
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(steps):
        trial.train_step()
    torch.cuda.synchronize()
    end = time.time()
    return steps * trial.cfg.examples_per_step / (end - start), start, end


def score_rate(trial: Any, batch_size: int) -> tuple[float, float, float]:
    """(scored rows/s, start, end) of one scoring pass over every evaluation set at `batch_size` rows a forward."""
    from tasks.finetune.scoring import choice_pairs, encode_pairs, score_rows

    encoded = [encode_pairs(trial.loaded.tokenizer, choice_pairs(s.eval), trial.cfg.max_len) for s in trial.sets]
    trial.model.eval()
    torch.cuda.synchronize()
    start = time.time()
    for rows in encoded:
        score_rows(trial.model, rows, trial.loaded.tokenizer.pad_token_id, batch_size, "cuda")
    torch.cuda.synchronize()
    end = time.time()
    trial.model.train()
    return sum(len(r) for r in encoded) / (end - start), start, end


def one(preset: str, optimizer: str, steps: int, batches: list[int], compile_model: bool | None) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    started = time.perf_counter()
    trial = make_trial(preset, optimizer, 0, compile_model)
    out: dict[str, Any] = {"preset": preset, "opt": optimizer, "compile": trial.cfg.compile,
                           "setup_and_warmup_s": time.perf_counter() - started,
                           "examples_per_s": train_rate(trial, steps)[0]}
    profiled = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            trial.train_step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    out["kernels_per_step"] = len(kernels) / profiled
    out["kernel_ms_per_step"] = sum(e.device_time for e in kernels) / profiled / 1e3
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:80], []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:TOP_KERNELS]
    out["top_kernels"] = [{"name": name, "per_step": len(t) / profiled, "ms_per_step": sum(t) / profiled / 1e3}
                          for name, t in top]
    out["ms_per_step"] = trial.cfg.examples_per_step / out["examples_per_s"] * 1e3
    for b in batches:
        out[f"rows_per_s_eval{b}"] = score_rate(trial, b)[0]
    return out


def summed(phases: list[tuple[float, float, float]]) -> dict[str, float]:
    """Processes' (rate, start, end) of one phase: their summed rate over its span (first start to last end), the span
    and their mean rate."""
    span = max(end for _, _, end in phases) - min(start for _, start, _ in phases)
    done = sum(rate * (end - start) for rate, start, end in phases)
    return {"aggregate_per_s": done / span, "span_s": span,
            "mean_per_process": sum(rate for rate, _, _ in phases) / len(phases)}


def _wait(barrier: str, phase: str, me: int, processes: int) -> None:
    open(os.path.join(barrier, f"{phase}.{me}"), "w").close()
    while sum(name.startswith(f"{phase}.") for name in os.listdir(barrier)) < processes:
        time.sleep(0.05)


def worker(preset: str, optimizer: str, steps: int, batches: list[int], compile_model: bool | None, barrier: str,
           processes: int, me: int) -> dict[str, Any]:
    trial = make_trial(preset, optimizer, me, compile_model)
    _wait(barrier, "train", me, processes)
    out: dict[str, Any] = {"me": me, "compile": trial.cfg.compile, "train": train_rate(trial, steps)}
    for b in batches:
        _wait(barrier, f"eval{b}", me, processes)
        out[f"eval{b}"] = score_rate(trial, b)
    return out


def many(processes: int, preset: str, optimizer: str, steps: int, batches: list[int],
         compile_model: bool | None) -> dict[str, Any]:
    started = time.perf_counter()
    name = __spec__.name if __spec__ else __name__
    with tempfile.TemporaryDirectory() as barrier:
        procs = [subprocess.Popen([sys.executable, "-m", name, "worker", "--preset", preset, "--optimizer", optimizer,
                                   "--steps", str(steps), "--eval-batch", ",".join(map(str, batches)),
                                   "--barrier", barrier, "--processes", str(processes), "--me", str(i)]
                                  + ([] if compile_model is None else ["--compile", "on" if compile_model else "off"]),
                                  stdout=subprocess.PIPE, text=True) for i in range(processes)]
        rows = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]

    out: dict[str, Any] = {"processes": processes, "preset": preset, "opt": optimizer, "compile": rows[0]["compile"],
                           "train_examples": summed([r["train"] for r in rows])}
    for b in batches:
        out[f"eval{b}_rows"] = summed([r[f"eval{b}"] for r in rows])
    out["total_s"] = time.perf_counter() - started
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m tasks.finetune.step_probe", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("one", "many", "worker"))
    parser.add_argument("--preset", choices=("mini", "mini-full"), default="mini")
    parser.add_argument("--optimizer", default="adamw", help="an optimizer registry name")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-batch", default="64", help="comma-separated scoring batch sizes")
    parser.add_argument("--compile", choices=("on", "off"), help="compile the decoder layers or not (default: as the "
                        "preset does)")
    parser.add_argument("--processes", type=int, default=6, help="`many`: processes sharing the GPU")
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--me", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "step_probe measures a CUDA GPU and none is visible here\n")
    batches = [int(b) for b in args.eval_batch.split(",") if b]
    compile_model = None if args.compile is None else args.compile == "on"
    if args.what == "one":
        out = one(args.preset, args.optimizer, args.steps, batches, compile_model)
    elif args.what == "many":
        out = many(args.processes, args.preset, args.optimizer, args.steps, batches, compile_model)
    else:
        out = worker(args.preset, args.optimizer, args.steps, batches, compile_model, args.barrier, args.processes,
                     args.me)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
