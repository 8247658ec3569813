"""Training-throughput benchmark of the LLaMA pre-training loop: tokens/s and model-FLOPs utilization.

It runs the task's own trainer (data pipeline, micro-batch accumulation, optimizer step and all) on a paper preset for
a few steps and reads the `tokens_per_sec` the loop reports between log points, leaving out the first window
(compilation, warm-up) and the evaluation. Each variant is a set of config overrides, so the table shows what each
change buys:

    python -m tasks.llm_pretrain.throughput --size 60m,130m,350m --variants eager,compile,compile-big-micro \
        --steps 30 --log-every 5 --json throughput.json

Variant ``anchor`` is the plain recipe researchers run, in the same process, so that every table has it beside the
harness: transformers' LlamaForCausalLM of the same size (SDPA attention, no KV cache) cast to bf16, torch.compile,
torch's fused AdamW, random full batches (no data pipeline) of the preset's batch, sequence length and micro-batch,
each step timed on the host between device syncs (median of ``--steps`` after two warm-up steps).

MFU = tokens/s x model FLOPs per token (the task's `estimate_flops`, 6N plus attention) / the device's dense bf16
peak (`--peak-tflops`, default an H100 SXM's 989). Tokens are the input tokens that are not padding; the full-batch
rate (`positions_per_sec`, all token positions, padding included) and the share of real tokens are reported beside.
Offline, the BPE fallback tokenizer is trained with the papers' vocabulary size (32000): the model has their shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from tasks.base import LocalContext
from tasks.llm_pretrain.config import PRESETS, LLMPretrainConfig
from tasks.llm_pretrain.model import build_llama, llama_config
from tasks.llm_pretrain.task import LLMPretrainTask

log = logging.getLogger(__name__)

H100_BF16_TFLOPS = 989.0

# name -> overrides of the paper preset; each adds one change to the one before it.
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"compile": False},
    "compile": {"compile": True},
    "compile-big-micro": {"compile": True, "micro_batch_size": 512},
    "compile-int4": {"compile": True, "quant": "int4"},
    "compile-fp4": {"compile": True, "quant": "fp4"},
    "compile-cudagraphs": {"compile": "cudagraphs"},
    "compile-fp4-cudagraphs": {"compile": "cudagraphs", "quant": "fp4"},
}
ANCHOR = "anchor"  # the plain transformers + torch.compile recipe (module docstring)
CHOICES = (*VARIANTS, ANCHOR)


def _config(size: str, variant: str, steps: int, log_every: int, overrides: dict[str, Any] | None) -> LLMPretrainConfig:
    """The paper preset of `size` (or the preset named `size`, e.g. mini) with the variant's overrides."""
    base = PRESETS.get(f"paper-{size}") or PRESETS.get(size) or {**PRESETS["smoke"], "model_size": size}
    settings = {**base, "bpe_vocab_size": 32000, **VARIANTS.get(variant, {}), **(overrides or {}), "steps": steps,
                "warmup_steps": 1, "log_every": log_every, "eval_every": steps, "eval_tokens": 4096,
                "checkpoint_every": 0, "workers": 1}
    settings["micro_batch_size"] = min(settings["micro_batch_size"], settings["batch_size"])
    return LLMPretrainConfig(**settings)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def anchor(size: str, steps: int, device: str, overrides: dict[str, Any] | None = None,
           peak_tflops: float = H100_BF16_TFLOPS) -> dict[str, Any]:
    """Time the plain recipe (module docstring) on the shape, batch and micro-batch of `size`'s preset."""
    cfg = _config(size, ANCHOR, max(steps, 2), 1, overrides)
    mc = llama_config(cfg.model_size)
    torch.manual_seed(0)
    model = build_llama(mc, device).to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=device.startswith("cuda"))
    forward = torch.compile(model) if device.startswith("cuda") else model
    accum = cfg.accumulation
    generator = torch.Generator(device=device).manual_seed(1234)
    data = torch.randint(1, mc.vocab_size, (accum + 1, cfg.micro_batch_size, cfg.seq_len), device=device,
                         generator=generator)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for k in range(steps + 2):
        _sync(device)
        t0 = time.perf_counter()
        for i in range(accum):
            x = data[(k * accum + i) % data.shape[0]]
            (forward(input_ids=x, labels=x).loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    windows = [tokens_per_step / s for s in seconds[2:]]  # two warm-up steps (the first compiles)
    tokens_per_sec = tokens_per_step / statistics.median(seconds[2:])
    flops_per_token = LLMPretrainTask().estimate_flops(cfg) / (cfg.steps * tokens_per_step)
    row = {
        "size": size, "variant": ANCHOR, "device": device, "precision": "bf16", "compile": device.startswith("cuda"),
        "batch_size": cfg.batch_size, "micro_batch_size": cfg.micro_batch_size, "seq_len": cfg.seq_len,
        "tokens_per_sec": tokens_per_sec, "positions_per_sec": tokens_per_sec, "real_token_fraction": 1.0,
        "windows": windows, "flops_per_token": flops_per_token,
        "mfu": tokens_per_sec * flops_per_token / (peak_tflops * 1e12), "data_source": "random",
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    del model, opt, forward, data
    if device.startswith("cuda"):
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return row


def measure(size: str, variant: str, steps: int, log_every: int, device: str, overrides: dict[str, Any] | None = None,
            peak_tflops: float = H100_BF16_TFLOPS) -> dict[str, Any]:
    """Train `steps` steps of the paper preset of `size` (or the preset named `size`, e.g. mini) with the variant's
    overrides and report its throughput (variant ``anchor``: the plain recipe, `anchor`)."""
    if variant == ANCHOR:
        return anchor(size, steps, device, overrides, peak_tflops)
    if steps < 2 * log_every:
        raise ValueError(f"steps ({steps}) must cover at least two log windows of {log_every} steps")
    cfg = _config(size, variant, steps, log_every, overrides)
    task = LLMPretrainTask()
    ctx = LocalContext(seed=0, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = task.run(cfg, "adamw", {}, ctx)
    windows = [v for _, v in ctx.series("tokens_per_sec")][1:]
    tokens_per_sec = statistics.median(windows)
    positions_per_sec = statistics.median([v for _, v in ctx.series("positions_per_sec")][1:])
    flops_per_token = task.estimate_flops(cfg) / (cfg.steps * cfg.batch_size * cfg.seq_len)
    mfu = tokens_per_sec * flops_per_token / (peak_tflops * 1e12)
    return {
        "size": size, "variant": variant, "device": device, "precision": cfg.precision, "compile": cfg.compile,
        "batch_size": cfg.batch_size, "micro_batch_size": cfg.micro_batch_size, "seq_len": cfg.seq_len,
        "tokens_per_sec": tokens_per_sec, "positions_per_sec": positions_per_sec,
        "real_token_fraction": tokens_per_sec / positions_per_sec, "windows": windows,
        "flops_per_token": flops_per_token, "mfu": mfu,
        "data_source": ctx.tags.get("data_source", ""), "quant": cfg.quant,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        # the first step's seconds: compilation when compiled (from the on-disk cache when an earlier run filled it)
        "first_step_s": ctx.series("time.first_step_s")[-1][1],
        # same seed and data in every variant: compiled variants should agree to bf16 rounding
        "train_loss": result["train_loss"], "val_loss": result["val_loss"],
    }


def markdown(rows: list[dict[str, Any]], peak_tflops: float) -> str:
    lines = [f"| size | variant | micro-batch | real tokens/s | all positions/s | MFU (of {peak_tflops:g} TFLOP/s) | "
             "peak memory | first step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
        first = f"{r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else "n/a"
        lines.append(f"| {r['size']} | {r['variant']} | {r['micro_batch_size']} | {r['tokens_per_sec']:,.0f} | "
                     f"{r['positions_per_sec']:,.0f} | {r['mfu']:.1%} | {mem} | {first} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="bench perf train", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="60m,130m,350m", help="comma-separated model sizes")
    parser.add_argument("--variants", default="eager,compile,compile-big-micro",
                        help=f"comma-separated, among {', '.join(CHOICES)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="extra config override for every run, e.g. --set batch_size=64")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in CHOICES]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(CHOICES)}")
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = " ".join(["bench perf train", *(sys.argv[1:] if argv is None else argv)])
    meta = {"torch": torch.__version__, "command": command,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    rows: list[dict[str, Any]] = []
    for size in args.size.split(","):
        for variant in args.variants.split(","):
            rows.append(measure(size, variant, args.steps, args.log_every, args.device, overrides, args.peak_tflops))
            log.info("%s %s: %.0f tokens/s, MFU %.1f%%", size, variant, rows[-1]["tokens_per_sec"],
                     100 * rows[-1]["mfu"])
            if args.json:  # after every run, so that a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(markdown(rows, args.peak_tflops))
    return rows


if __name__ == "__main__":
    main()
