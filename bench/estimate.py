"""Dry-run cost estimates: GPU-hours of a trial matrix from each task's FLOP count and a stated throughput, and the
wall time of its GPU trials packed on the GPUs at a measured throughput."""

from __future__ import annotations

from dataclasses import dataclass

from bench.suite import Trial, unique_specs

# Stated throughput: an H100's dense bf16 peak (989 TFLOP/s) at 40% model-FLOPs utilization.
PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40
THROUGHPUT = PEAK_FLOPS * ASSUMED_MFU

# Measured: training tokens per second of one H200 running `mini` LLaMA pre-training trials side by side (whole
# trials: start-up, data preparation and evaluation included). Source: results/mini/README.md, commit 96c4b68: ten
# eager mini trials at 0.1 GPU each, BF16 and INT4, about 250M tokens in 480 s (FP4 runs at about 0.2M). Wall times
# of other GPU trials are scaled by their FLOPs per token.
MEASURED_TOKENS_PER_SEC = 0.5e6
MEASURED_ON = "one H200, ten eager mini LLaMA trials at a time in BF16/INT4, commit 96c4b68"
# Measured in the same runs: eager FP4 fake quantization trains at about 0.2M tokens/s (2.5x the time).
QUANT_SLOWDOWN = {"fp4": 2.5}


@dataclass
class Estimate:
    key: str
    label: str
    flops: float
    seconds: float  # the task's own wall-clock estimate, for tasks not bound by FLOPs
    gpus: float
    cpus: float

    @property
    def gpu_hours(self) -> float:
        """GPU time the trial's FLOPs take at the stated throughput (0 when the task states no FLOP count)."""
        return self.flops / THROUGHPUT / 3600

    @property
    def cpu_hours(self) -> float:
        """CPU time of a task that states wall-clock seconds instead of FLOPs."""
        return self.seconds * self.cpus / 3600


def estimate(trials: list[Trial]) -> list[Estimate]:
    import tasks

    out = []
    for spec in unique_specs(trials):
        task = tasks.get_task(spec.task)
        cfg = task.Config(**spec.config)
        res = task.resources(cfg)
        out.append(Estimate(spec.key(), spec.label(), task.estimate_flops(cfg), task.estimate_seconds(cfg),
                            res.gpus * res.workers, res.cpus))
    return out


def describe_throughput() -> str:
    return f"{THROUGHPUT / 1e12:.0f} TFLOP/s per GPU (H100 bf16 peak {PEAK_FLOPS / 1e12:.0f} at {ASSUMED_MFU:.0%} MFU)"


def measured_flops_per_sec() -> float:
    """Effective FLOP/s of one GPU packed with mini pre-training trials, from the measured tokens per second."""
    import tasks

    task = tasks.get_task("llm_pretrain")
    cfg = task.config("mini")
    per_token = task.estimate_flops(cfg) / (cfg.steps * cfg.batch_size * cfg.seq_len)
    return MEASURED_TOKENS_PER_SEC * per_token


def wall_minutes(trials: list[Trial], gpus: int = 1) -> dict[str, float]:
    """Per table, minutes of wall time of its GPU trials packed on `gpus` GPUs at the measured throughput (a trial
    that several tables share counts once, in the first)."""
    rate = measured_flops_per_sec() * gpus
    table_of: dict[str, str] = {}
    for t in trials:
        table_of.setdefault(t.key, t.table)
    out: dict[str, float] = {}
    for spec, e in zip(unique_specs(trials), estimate(trials), strict=True):
        if e.gpus and e.flops:
            slowdown = QUANT_SLOWDOWN.get(str(spec.config.get("quant", "none")), 1.0)
            table = table_of[spec.key()]
            out[table] = out.get(table, 0.0) + e.flops * slowdown / rate / 60
    return out


def describe_wall_time(trials: list[Trial], gpus: int = 1) -> str:
    parts = wall_minutes(trials, gpus)
    if not parts:
        return "no GPU trials"
    each = ", ".join(f"{table} {m:.1f} min" for table, m in parts.items())
    return (f"estimated wall time of the GPU trials on {gpus} GPU: {sum(parts.values()):.0f} min ({each}) at "
            f"{MEASURED_TOKENS_PER_SEC / 1e6:g}M mini-LLaMA tokens/s per GPU, FP4 {QUANT_SLOWDOWN['fp4']:g}x slower "
            f"(measured: {MEASURED_ON})")
