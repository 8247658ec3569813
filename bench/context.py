"""The trial context the harness gives a task: metrics to Ray Tune and MLflow, checkpoints in a per-trial folder.

Metric points are buffered and written to MLflow before each checkpoint, every `flush_seconds`, and at the end.
The highest step written per metric is kept beside the checkpoint, so a trial resumed after a kill does not write
the points it recomputes a second time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench import tracking
from tasks.base import LocalContext, check_finite


class HarnessContext:
    """`tasks.base.TrialContext` for trials run by the harness (inside a Ray Tune worker or in-process)."""

    def __init__(self, uri: str, run_id: str, trial_dir: Path, seed: int, device: str,
                 flush_seconds: float = 30.0, tune_report: bool = True) -> None:
        self.uri, self.run_id, self.seed, self.device = uri, run_id, seed, device
        self.trial_dir = trial_dir
        self.artifact_dir = trial_dir / "artifacts"
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self._ckpt = trial_dir / "checkpoint.pt"
        (trial_dir / "worker.pid").write_text(str(os.getpid()))  # lets an operator (or a test) find the worker
        self._written_file = trial_dir / "written_steps.json"
        self._written: dict[str, int] = (
            json.loads(self._written_file.read_text()) if self._written_file.exists() else {}
        )
        self._buffer: list[tuple[int, str, float, int]] = []
        self._last_flush = time.monotonic()
        self._flush_seconds = flush_seconds
        self._tune_report = tune_report
        self.last_metrics: dict[str, float] = {}

    # --- TrialContext --------------------------------------------------------------------------------------------

    def report(self, step: int, **metrics: float) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        now = int(time.time() * 1000)
        self._buffer.extend((step, k, v, now) for k, v in values.items() if step > self._written.get(k, -1))
        self.last_metrics.update(values)
        self.last_metrics["step"] = step
        check_finite(values)
        if self._tune_report:
            from ray import tune

            tune.report({**{k.replace("/", "."): v for k, v in values.items()}, "step": step})
        if time.monotonic() - self._last_flush > self._flush_seconds:
            self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        tracking.log_params(self.uri, self.run_id, params)

    def set_tags(self, **tags: str) -> None:
        c = tracking.client(self.uri)
        for k, v in tags.items():
            tracking.retry(lambda k=k, v=v: c.set_tag(self.run_id, k, str(v)))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        # Points first, checkpoint second: a kill in between resumes from the older checkpoint and skips the points
        # already written, whereas the other order would resume past points that were never written.
        self.flush()
        tmp = self._ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._ckpt)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self._ckpt.exists():
            return None
        state = torch.load(self._ckpt, map_location="cpu", weights_only=True)
        self.set_tags(**{"bench.resumed_from_step": str(state.get("step", "?"))})
        return state

    # --- harness side --------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write buffered metric points to MLflow and remember the highest step written per metric."""
        if self._buffer:
            tracking.log_metrics(self.uri, self.run_id, self._buffer)
            for step, key, _, _ in self._buffer:
                self._written[key] = max(step, self._written.get(key, -1))
            tmp = self._written_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._written))
            tmp.replace(self._written_file)
            self._buffer.clear()
        self._last_flush = time.monotonic()

    def upload_artifacts(self) -> None:
        if any(self.artifact_dir.iterdir()):
            tracking.retry(lambda: tracking.client(self.uri).log_artifacts(self.run_id, str(self.artifact_dir)))


class ReplicaContext(LocalContext):
    """The context of a data-parallel worker other than rank 0: it reads rank 0's checkpoint and checks its metrics
    (so every rank stops on a divergence together) but writes nothing that rank 0 owns."""

    def __init__(self, trial_dir: Path, seed: int, device: str) -> None:
        super().__init__(seed=seed, device=device)  # artifacts go to a scratch folder
        self._ckpt = trial_dir / "checkpoint.pt"

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Rank 0 saves the (identical) state."""
