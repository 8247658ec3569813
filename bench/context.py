"""The trial context the harness gives a task: metrics to Ray Tune and MLflow, checkpoints in a per-trial folder.

Metric points are buffered and written to MLflow before each checkpoint, every `flush_seconds`, and at the end.
The highest step written per metric is kept beside the checkpoint, so a trial resumed after a kill does not write
the points it recomputes a second time. On resume that record is checked against the store, which is the truth: a
store that lacks recorded points (it was lost or replaced) restarts the trial from step 0, and a checkpoint that
cannot be read is set aside with a warning naming it, the trial restarting cleanly. Files are the user's only.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench import tracking
from tasks.base import LocalContext, check_finite

log = logging.getLogger(__name__)
CHECKPOINT_STEP = "checkpoint_step.json"  # the step of checkpoint.pt, readable without loading it
SET_ASIDE_TAG = "bench.set_aside"  # the latest file a trial set aside, and why
RESTART = "the trial restarts from step 0 and does not write the points the store already has"


class HarnessContext:
    """`tasks.base.TrialContext` for trials run by the harness (inside a Ray Tune worker or in-process)."""

    def __init__(self, uri: str, run_id: str, trial_dir: Path, seed: int, device: str,
                 flush_seconds: float = 30.0, tune_report: bool = True, stall_s: float = 0.0) -> None:
        self.uri, self.run_id, self.seed, self.device = uri, run_id, seed, device
        self.trial_dir = tracking.private_dir(trial_dir)
        self.artifact_dir = tracking.private_dir(trial_dir / "artifacts")
        self._ckpt = trial_dir / "checkpoint.pt"
        (trial_dir / "worker.pid").write_text(str(os.getpid()))  # lets an operator (or a test) find the worker
        self._written_file = trial_dir / "written_steps.json"
        self._written = self._reconcile(self._read_record())
        self._buffer: list[tuple[int, str, float, int]] = []
        self._last_flush = time.monotonic()
        self._flush_seconds = flush_seconds
        self._tune_report = tune_report
        self.last_metrics: dict[str, float] = {}
        self._stall_s = stall_s
        self._watch()

    def _watch(self) -> None:
        """(Re)start the stall watchdog: unless `report` is called within `stall_s`, the process prints every thread's
        stack and exits (status 1), so that Ray retries the trial (0: no watchdog)."""
        if self._stall_s > 0:
            faulthandler.dump_traceback_later(self._stall_s, exit=True)

    def unwatch(self) -> None:
        """Stop the stall watchdog (the trial ended, or is failing anyway)."""
        if self._stall_s > 0:
            faulthandler.cancel_dump_traceback_later()

    # --- TrialContext --------------------------------------------------------------------------------------------

    def report(self, step: int, **metrics: float) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        now = int(time.time() * 1000)
        self._buffer.extend((step, k, v, now) for k, v in values.items() if step > self._written.get(k, -1))
        self.last_metrics.update(values)
        self.last_metrics["step"] = step
        self._watch()
        check_finite(values)
        if self._tune_report:
            from ray import tune

            tune.report({**{k.replace("/", "."): v for k, v in values.items()}, "step": step})
        if time.monotonic() - self._last_flush > self._flush_seconds:
            self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        tracking.log_params(self.uri, self.run_id, params)

    def set_tags(self, **tags: str) -> None:
        tracking.set_tags(self.uri, self.run_id, tags)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        # Points first, checkpoint second: a kill in between resumes from the older checkpoint and skips the points
        # already written, whereas the other order would resume past points that were never written.
        self.flush()
        tmp = self._ckpt.with_suffix(".tmp")
        try:
            with os.fdopen(tracking.private_file(tmp), "wb") as f:
                torch.save(state, f)
            tmp.replace(self._ckpt)
            _write_json(self.trial_dir / CHECKPOINT_STEP, {"step": state.get("step")})
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if tracking.is_disk_full(exc):
                raise tracking.DiskFullError(tmp) from None
            raise

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self._ckpt.exists():
            return None
        try:
            state = torch.load(self._ckpt, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(f"holds a {type(state).__name__}, not a dict")
        except Exception as exc:  # noqa: BLE001 - truncated files, random bytes, objects that are not weights
            self._set_aside(self._ckpt, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                            RESTART)
            return None
        self.set_tags(**{"bench.resumed_from_step": str(state.get("step", "?"))})
        return state

    def close(self) -> None:
        """The trial is done: remove its checkpoint and records (anything set aside stays, with the folder)."""
        self.unwatch()
        for name in ("checkpoint.pt", CHECKPOINT_STEP, "written_steps.json", "worker.pid"):
            (self.trial_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.artifact_dir, ignore_errors=True)
        if not any(self.trial_dir.iterdir()):
            self.trial_dir.rmdir()

    # --- resuming ------------------------------------------------------------------------------------------------

    def _read_record(self) -> dict[str, int]:
        if not self._written_file.exists():
            return {}
        try:
            record = json.loads(self._written_file.read_text())
            if not isinstance(record, dict) or not all(isinstance(v, int) for v in record.values()):
                raise ValueError("not a mapping of metric names to steps")
            return record
        except (ValueError, OSError) as exc:
            self._set_aside(self._written_file, str(exc)[:200], "the store says which points are written")
            return {}

    def _reconcile(self, record: dict[str, int]) -> dict[str, int]:
        """The highest step per metric that the store holds. Where the record claims points the store lacks, the
        checkpoint is set aside so the trial recomputes them from step 0 (skipping the points the store has)."""
        c = tracking.client(self.uri)
        keys = set(tracking.retry(lambda: c.get_run(self.run_id)).data.metrics) | set(record)
        stored = {}
        for key in keys:
            steps = [m.step for m in tracking.retry(lambda key=key: c.get_metric_history(self.run_id, key))]
            if steps:
                stored[key] = max(steps)
        lost = sorted(k for k, step in record.items() if stored.get(k, -1) < step)
        if lost and self._ckpt.exists():
            what = ", ".join(f"{k} after step {stored.get(k, 'none')}" for k in lost[:3])
            self._set_aside(self._ckpt, f"the store lacks points it recorded as written ({what})", RESTART)
        return stored

    def _set_aside(self, path: Path, why: str, then: str) -> None:
        """Rename a file that cannot be used, with one warning naming it (also kept as the run's SET_ASIDE_TAG)."""
        if not path.exists():
            return
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        path.replace(aside)
        if path == self._ckpt:
            (self.trial_dir / CHECKPOINT_STEP).unlink(missing_ok=True)
        message = f"set aside {aside} ({why}); {then}"
        log.warning("trial %s: %s", self.trial_dir.name, message)
        self.set_tags(**{SET_ASIDE_TAG: message[:5000]})

    # --- harness side --------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write buffered metric points to MLflow and remember the highest step written per metric."""
        if self._buffer:
            tracking.log_metrics(self.uri, self.run_id, self._buffer)
            for step, key, _, _ in self._buffer:
                self._written[key] = max(step, self._written.get(key, -1))
            _write_json(self._written_file, self._written)
            self._buffer.clear()
        self._last_flush = time.monotonic()

    def upload_artifacts(self) -> None:
        if any(self.artifact_dir.iterdir()):
            tracking.retry(lambda: tracking.client(self.uri).log_artifacts(self.run_id, str(self.artifact_dir)))


def _write_json(path: Path, value: Any) -> None:
    """Replace a small record atomically (user-only file; a full disk leaves no temp file and says which disk)."""
    tmp = path.with_suffix(".tmp")
    try:
        with os.fdopen(tracking.private_file(tmp), "w") as f:
            json.dump(value, f)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if tracking.is_disk_full(exc):
            raise tracking.DiskFullError(path) from None
        raise


class ReplicaContext(LocalContext):
    """The context of a data-parallel worker other than rank 0: it reads rank 0's checkpoint and checks its metrics
    (so every rank stops on a divergence together) but writes nothing that rank 0 owns."""

    def __init__(self, trial_dir: Path, seed: int, device: str) -> None:
        super().__init__(seed=seed, device=device)  # artifacts go to a scratch folder
        self._ckpt = trial_dir / "checkpoint.pt"

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Rank 0 saves the (identical) state."""
