"""Dry-run cost estimates: GPU-hours of a trial matrix from each task's FLOP count and a stated throughput."""

from __future__ import annotations

from dataclasses import dataclass

from bench.suite import Trial, unique_specs

# Stated throughput: an H100's dense bf16 peak (989 TFLOP/s) at 40% model-FLOPs utilization.
PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.40
THROUGHPUT = PEAK_FLOPS * ASSUMED_MFU


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
