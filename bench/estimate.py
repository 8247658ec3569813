"""Dry-run cost estimates: GPU-hours of a trial matrix from each task's FLOP count and a stated throughput, and the
wall time of its GPU trials packed on the GPUs: a fresh machine's start, counted once, then each trial holds its GPU
share for the seconds its task measured (`Task.estimate_seconds`), or else for its FLOPs at the measured mini-LLaMA
rate. Those were measured with the trials time-sliced on the GPU; through MPS (`bench.mps`, a local run's default on
a GPU machine) each task's trials take its measured `Task.mps_speedup` times less once started."""

from __future__ import annotations

from dataclasses import dataclass

from bench.mps import DEFAULT_MODE, Mode, expects_mps
from bench.suite import Trial, unique_specs

# Stated throughput: an H100's dense bf16 peak (989 TFLOP/s) at 40% model-FLOPs utilization.
PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40
THROUGHPUT = PEAK_FLOPS * ASSUMED_MFU

# Measured: training tokens per second of one H200 running `mini` LLaMA pre-training trials side by side, once they
# started. Source: results/mini/README.md ("Throughput and the 25-minute goal"): on a fresh machine twenty trials at
# 0.05 GPU each, compiled with CUDA graphs (the preset's `compile: cudagraphs`), left the GPU idle for the first 125 s
# (`nvidia-smi` every 5 s: Ray, data preparation and twenty cold compilations at once), then trained 0.718G tokens (34
# BF16, 30 FP4 and 15 INT4 trials finished, twenty more stopped part-way) in the 401 s to the stop at 526 s. Once
# started the GPU is busy (100% in the samples, outside the waves of compilations), so the rate is the GPU's, not the
# packing's: ten bare CUDA-graph steps at once reach 3.1M tokens/s, 3.5M through MPS
# (results/perf/h200_mini_mps.json). Wall times of other GPU trials are scaled by their FLOPs per token.
COLD_START_S = 125.0
MEASURED_TOKENS_PER_SEC = 0.718e9 / (526 - COLD_START_S)
MEASURED_ON = "one H200, twenty mini LLaMA trials at a time with CUDA graphs, BF16/FP4/INT4, after the start"


@dataclass
class Estimate:
    key: str
    label: str
    flops: float
    seconds: float  # the task's own wall-clock estimate, for tasks not bound by FLOPs
    gpus: float
    cpus: float
    mps_speedup: float = 1.0  # the task's (`Task.mps_speedup`)

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
                            res.gpus * res.workers, res.cpus, task.mps_speedup))
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


def _minutes_both_ways(trials: list[Trial], gpus: int) -> dict[str, tuple[float, float]]:
    """Per table, minutes of wall time of its GPU trials packed on `gpus` GPUs at the measured throughput (a trial
    that several tables share counts once, in the first): (time-sliced, through MPS)."""
    rate = measured_flops_per_sec() * gpus
    table_of: dict[str, str] = {}
    for t in trials:
        table_of.setdefault(t.key, t.table)
    out: dict[str, tuple[float, float]] = {}
    for spec, e in zip(unique_specs(trials), estimate(trials), strict=True):
        if e.gpus and (e.seconds or e.flops):
            table = table_of[spec.key()]
            # A task's own measured seconds hold its GPU share that long; otherwise its FLOPs at the measured rate.
            minutes = e.seconds * e.gpus / gpus / 60 if e.seconds else e.flops / rate / 60
            sliced, shared = out.get(table, (0.0, 0.0))
            out[table] = (sliced + minutes, shared + minutes / e.mps_speedup)
    return out


def wall_minutes(trials: list[Trial], gpus: int = 1, mps: bool = False) -> dict[str, float]:
    """Per table, minutes of wall time of its GPU trials on `gpus` GPUs, time-sliced or through MPS."""
    return {table: both[mps] for table, both in _minutes_both_ways(trials, gpus).items()}


def wall_total_minutes(trials: list[Trial], gpus: int = 1, mps: bool = False) -> float:
    """Minutes from launch to the last GPU trial's end on a fresh machine: the start, then every table's GPU time."""
    return _with_start(wall_minutes(trials, gpus, mps))


def _with_start(parts: dict[str, float]) -> float:
    return COLD_START_S / 60 + sum(parts.values()) if parts else 0.0


def describe_wall_time(trials: list[Trial], mps_mode: Mode = DEFAULT_MODE, gpus: int = 1) -> str:
    """The wall time of the GPU trials as a run with `--mps mps_mode` would share the GPU, and the other way."""
    mps = expects_mps(mps_mode)
    both = _minutes_both_ways(trials, gpus)
    if not both:
        return "no GPU trials"
    parts = {table: minutes[mps] for table, minutes in both.items()}
    other = _with_start({table: minutes[not mps] for table, minutes in both.items()})
    each = ", ".join(f"{table} {m:.1f} min" for table, m in parts.items())
    how = "through MPS" if mps else "time-sliced"
    return (f"estimated wall time of the GPU trials on {gpus} GPU, {how} (--mps {mps_mode}): "
            f"{_with_start(parts):.0f} min ({COLD_START_S / 60:.1f} min starting on a fresh machine, then {each}; "
            f"{'time-sliced' if mps else 'through MPS'}: {other:.0f} min) at {MEASURED_TOKENS_PER_SEC / 1e6:.2g}M "
            f"mini-LLaMA tokens/s per GPU time-sliced (measured: {MEASURED_ON})")
