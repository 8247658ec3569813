"""The task contract: a task owns model, data, loss, evaluation and budget; the optimizer owns only the update.

A task is a subclass of `Task` with a pydantic `Config`, named presets, declared resources and a `run` method that
trains with an optimizer from the `optimizers` registry and reports metrics through a `TrialContext`.
`LocalContext` is a plain in-process context, so a task can run (and be tested) without the harness.
`trial_optimizer` is the one place that turns a trial's optimizer name and hyperparameters, with the task's values,
into the registry's verified optimizer; `torch_threads`, `seed_everything`, `rng_state`, `cache_dir` and
`hub_offline_reason` are shared by the tasks. A task declares how its results are summarised (`summary`, module
`tasks.summary`), which per-run statistics it writes (`statistics`) and which command-line benchmarks it offers
(`benchmarks`), so the harness reads them from here.
"""

from __future__ import annotations

import math
import os
import random
import socket
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable
from urllib.parse import urlparse

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from tasks.summary import Summary, SummaryKind, summarise


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
    # The field holding the learning rate that a trial without its own ``lr`` uses (`trial_optimizer`).
    lr_field: ClassVar[str] = "lr"
    # Fields that choose how a trial executes, not what it trains (e.g. torch.compile): the trial's identity reads
    # them at their defaults, so that changing them reuses the finished trials and resumes the rest from checkpoints.
    runtime_fields: ClassVar[frozenset[str]] = frozenset()

    def identity_defaults(self) -> dict[str, Any]:
        """The runtime fields at their defaults, as the trial's identity reads them."""
        return {name: type(self).model_fields[name].default for name in sorted(self.runtime_fields)}

    def unset_hparams(self) -> dict[str, Any]:
        """What a trial that leaves them unset is given (`trial_optimizer` reads it here, and a trial's key): the
        config's learning rate."""
        return {"lr": float(getattr(self, self.lr_field))}


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


@dataclass(frozen=True)
class TrialOptimizer:
    """One trial's optimizer: the registry name, every hyperparameter it is given, and where they came from."""

    name: str
    hparams: dict[str, Any]
    filled: dict[str, Any]  # what the task supplied (besides the learning rate)
    lr_source: str  # "hparams" or "task config"

    @property
    def lr(self) -> float:
        return float(self.hparams["lr"])

    def build(self, params: Any, where: str = "the training optimizer") -> tuple[torch.optim.Optimizer, dict[str, Any]]:
        """The registry's optimizer over `params` (a model, tensors or groups), verified: (optimizer, resolved)."""
        import optimizers

        opt = optimizers.build(self.name, params, **self.hparams)
        return opt, self.verify(opt, where)

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """A class for libraries that construct the optimizer themselves (check what they built with `verify`)."""
        import optimizers

        return optimizers.optimizer_class(self.name, **self.hparams)

    def verify(self, opt: torch.optim.Optimizer, where: str) -> dict[str, Any]:
        """Raise unless `opt` is this registry optimizer with every hyperparameter; return its resolved ones."""
        import optimizers

        return optimizers.verify(opt, self.name, self.hparams, where=where)

    def tags(self) -> dict[str, str]:
        return {"task_filled_hparams": ", ".join(f"{k}={v}" for k, v in self.filled.items()) or "none"}


def trial_optimizer(name: str, hparams: dict[str, Any], cfg: TaskConfig, seed: int | None = None,
                    **run_values: Any) -> TrialOptimizer:
    """The optimizer of one trial: the trial's hyperparameters; the trial's ``lr``, else the task config's (the
    field `cfg.lr_field`) where the optimizer takes one; and, where the trial leaves them unset and the optimizer
    accepts them, `seed` (sparse-momentum draws) and the task's `run_values` (`total_steps`, `weight_decay`, ...)."""
    import optimizers

    requested = dict(hparams)
    spec = optimizers.spec(name)
    if "lr" in requested or "lr" in spec.accepts or spec.accepts_any:
        requested["lr"] = float(requested.get("lr", cfg.unset_hparams()["lr"]))
    requested, filled = fill_hparams(name, requested, **run_values, seed=seed)
    return TrialOptimizer(name, requested, filled, "hparams" if "lr" in hparams else "task config")


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch threads (unchanged for None or 0), restoring the previous count after."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """torch's, numpy's and python's global RNG states (and the CUDA one of a CUDA `device`), as checkpoint-safe
    values (tensors, numbers, lists)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` returned (the parts it holds)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        np_state = state["numpy"]
        keys = np_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    if "python" in state:
        py_state = state["python"]
        random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss"]))


def cache_dir(*parts: str) -> Path:
    """Where tasks keep what they derive once (tokenizers, converted models): ``$BENCH_CACHE``, else
    ``~/.cache/bench``."""
    return Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "bench", *parts)


OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_HUB_REACHABLE: bool | None = None


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub is out of reach (an offline variable or a failed 2 s connection, probed once per
    process), None when it answers."""
    global _HUB_REACHABLE
    flags = [v for v in OFFLINE_ENV if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if flags:
        return f"{flags[0]}=1"
    if _HUB_REACHABLE is None:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=2.0).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return None if _HUB_REACHABLE else "no connection to the Hugging Face hub"


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
    # How a table cell summarises `metric` over seeds (`tasks.summary`): mean ± std, or IQM with a bootstrap CI.
    summary: ClassVar[SummaryKind] = "mean"
    # The papers' own estimate of the headline metric, where the task reports it beside `metric` (shown labelled).
    paper_metric: ClassVar[str | None] = None
    # Per-run statistics the task writes as artifacts, by name (e.g. "layer_spikes": a CSV file), for the analyses.
    statistics: ClassVar[dict[str, str]] = {}
    # Command-line benchmarks the task offers (`bench perf NAME ARGS...`): name -> "module:function", a function that
    # takes the arguments after the name.
    benchmarks: ClassVar[dict[str, str]] = {}
    # How many times faster the GPU-bound part of its trials runs when the trials sharing a GPU do so through MPS
    # instead of time-sliced, as measured for the task (`bench.mps`); 1.0 where not measured.
    mps_speedup: ClassVar[float] = 1.0

    def summarise(self, values: Sequence[float]) -> Summary | None:
        """The summary of one cell's final `metric` values (None without values)."""
        return summarise(self.summary, values)

    def benchmark(self, name: str) -> Callable[[list[str]], Any]:
        """The entry point of one of `benchmarks`."""
        module, function = self.benchmarks[name].split(":")
        return getattr(import_module(module), function)

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
