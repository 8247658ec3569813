"""Trial retries in the terminal: one line per failed attempt ("worker died, retrying from step N") in place of the
Ray traceback Tune logs for it (shown with --debug; the error is also kept in the trial's MLflow run)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from bench.spec import TrialSpec

log = logging.getLogger("bench.runner")
TUNE_LOGGER = "ray.tune.execution.tune_controller"
PREFIX = "Trial task failed for trial "


class _Errors(logging.Filter):
    """Takes Tune's "Trial task failed" records out of the log, keeping their exception for `Retries`."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, BaseException | None] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(PREFIX):
            return True
        self.last[message.removeprefix(PREFIX)] = record.exc_info[1] if record.exc_info else None
        return False


ERRORS = _Errors()


class Retries(Callback):
    """Says, for each retried trial, why its attempt ended and the step its next attempt resumes from."""

    def __init__(self, step_of: Any) -> None:
        self._step_of = step_of  # trial folder -> step of its checkpoint (None without one)

    def setup(self, **info: Any) -> None:
        logging.getLogger(TUNE_LOGGER).addFilter(ERRORS)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from ray.exceptions import RayActorError

        t = trial.config["trial"]
        exc = ERRORS.last.pop(str(trial), None)
        if exc is None or isinstance(exc, RayActorError):
            what = "worker died"
        else:
            lines = [x for x in str(exc).splitlines() if x.strip()]
            what = f"failed ({(lines[-1] if lines else type(exc).__name__)[:200]})"
        step = self._step_of(Path(t["trial_dir"])) or 0
        log.warning("trial %s: %s, retrying from step %d", TrialSpec(**t["spec"]).label(), what, step)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ERRORS.last.pop(str(trial), None)  # its error is reported with the run's outcome

