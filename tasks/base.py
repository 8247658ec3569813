"""The task contract: a task owns model, data, loss, evaluation and budget; the optimizer owns only the update.

A task is a subclass of `Task` with a pydantic `Config`, named presets, declared resources and a `run` method that
trains with an optimizer from the `optimizers` registry and reports metrics through a `TrialContext`.
`LocalContext` is a plain in-process context, so a task can run (and be tested) without the harness.
"""

from __future__ import annotations

import math
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Diverged(Exception):
    """Raised (by a task or by `TrialContext.report`) when a trial's loss or gradients blow up."""


# Metric names that must stay finite; a NaN/inf in one of them marks the trial as diverged.
GUARDED_METRICS = ("loss", "train_loss", "val_loss", "grad_norm")
# A reported global gradient norm above this counts as an explosion: the trial is diverged.
GRAD_NORM_LIMIT = 1e6


class Resources(BaseModel):
    """What one trial asks the scheduler for, per worker. `gpus` may be a fraction so small trials share a GPU."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    workers: int = Field(1, ge=1, description="Ray Train workers (one GPU each) for multi-GPU trials")


def _must_exist(path: str) -> str:
    if not Path(path).expanduser().exists():
        raise ValueError(f"path {path!r} does not exist")
    return path


# A config field naming local data: a missing path is an error when the config is validated, before any trial.
ExistingPath = Annotated[str, AfterValidator(_must_exist)]


class TaskConfig(BaseModel):
    """Base class of every task's config: unknown fields are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@runtime_checkable
class TrialContext(Protocol):
    """What a running trial may use. The harness implements it on top of Ray Tune and MLflow."""

    seed: int
    device: str
    artifact_dir: Path

    def report(self, step: int, **metrics: float) -> None:
        """Record metrics at a training step. Raises `Diverged` if a guarded metric is NaN/inf."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record parameters (e.g. the optimizer's resolved hyperparameters at step 0)."""

    def set_tags(self, **tags: str) -> None:
        """Record free-form tags (data source actually used, precision of optimizer state, ...)."""

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Persist a resumable state (tensors, numbers, strings, nested dicts/lists only)."""

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last saved state, loaded weights-only, or None on a fresh start."""


def trial_device(requested: str, ctx: TrialContext) -> str:
    """Where a trial runs: `cpu` pins it to the CPU; otherwise (`cuda`, `auto`) it runs where the harness placed it,
    which is the CPU when the cluster has no GPU."""
    return "cpu" if requested == "cpu" else ctx.device


def check_finite(metrics: dict[str, float]) -> None:
    """Raise `Diverged` for a NaN/inf guarded metric or a gradient norm above `GRAD_NORM_LIMIT`."""
    bad = {k: v for k, v in metrics.items() if k in GUARDED_METRICS and not math.isfinite(float(v))}
    if bad:
        raise Diverged(f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}")
    norm = metrics.get("grad_norm")
    if norm is not None and float(norm) > GRAD_NORM_LIMIT:
        raise Diverged(f"exploding gradient: grad_norm={float(norm):.3g} > {GRAD_NORM_LIMIT:g}")


def fill_hparams(optimizer: str, hparams: dict[str, Any], **task_values: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trial's hyperparameters plus the task's values for those the optimizer accepts and the trial leaves unset.

    Tasks supply what the reference runs derived from the run itself (`total_steps` = the trial's optimizer steps for
    Stable-SPAM's schedule, `seed` for sparse subsets, the preset's `lr`, ...); values of None are not supplied.
    Returns (all hyperparameters, the ones the task filled) so the filled ones can be tagged on the run.
    """
    import optimizers

    accepts = optimizers.spec(optimizer).accepts
    filled = {k: v for k, v in task_values.items() if v is not None and k in accepts and k not in hparams}
    return {**hparams, **filled}, filled


class LocalContext:
    """An in-process `TrialContext`: keeps metrics in memory and checkpoints in a folder."""

    def __init__(self, seed: int = 0, device: str | None = None, workdir: str | Path | None = None) -> None:
        self.seed = seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-trial-"))
        self.artifact_dir = root / "artifacts"
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self._ckpt = root / "checkpoint.pt"
        self.metrics: list[tuple[int, str, float]] = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}

    def report(self, step: int, **metrics: float) -> None:
        self.metrics.extend((step, k, float(v)) for k, v in metrics.items())
        check_finite(metrics)

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def set_tags(self, **tags: str) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        tmp = self._ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._ckpt)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self._ckpt.exists():
            return None
        return torch.load(self._ckpt, map_location="cpu", weights_only=True)

    def series(self, name: str) -> list[tuple[int, float]]:
        """The (step, value) points logged for one metric name."""
        return [(s, v) for s, k, v in self.metrics if k == name]


class Task(ABC):
    """One experiment family. Subclasses set the class attributes and implement `resources` and `run`."""

    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]]
    presets: ClassVar[dict[str, dict[str, Any]]]  # preset name -> field overrides; must include "smoke"
    metric: ClassVar[str]  # the headline metric of the final results (e.g. "val_perplexity")
    mode: ClassVar[Literal["min", "max"]]

    def config(self, preset: str = "smoke", overrides: dict[str, Any] | None = None) -> TaskConfig:
        """The validated config of a preset with overrides applied (raises KeyError / ValidationError)."""
        if preset not in self.presets:
            raise KeyError(f"unknown preset {preset!r} for task {self.name!r}; valid: {', '.join(self.presets)}")
        return self.Config(**{**self.presets[preset], **(overrides or {})})

    @abstractmethod
    def resources(self, cfg: TaskConfig) -> Resources:
        """What one trial of this config needs."""

    def estimate_flops(self, cfg: TaskConfig) -> float:
        """Approximate training FLOPs of one trial, for GPU-hour estimates (0 when unknown)."""
        return 0.0

    def estimate_seconds(self, cfg: TaskConfig) -> float:
        """Wall-clock seconds of one trial on its declared resources, for tasks not bound by FLOPs (0 when unknown)."""
        return 0.0

    @abstractmethod
    def run(self, cfg: TaskConfig, optimizer: str, hparams: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
        """Train and evaluate; report curves through `ctx`; return the final metrics (must include `metric`)."""
