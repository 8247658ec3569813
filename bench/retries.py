"""Trial retries in the terminal: one line per failed attempt ("worker died, retrying from step N") in place of the
Ray traceback Tune logs for it (shown with --debug; the error is also kept in the trial's MLflow run). For a worker
that died, the line names the fatal error its Ray log ends with (Ray's workers dump their Python stacks on a fatal
signal), and the end of that log is kept in the trial's run as `worker_death_<pid>.txt`."""

from __future__ import annotations

import logging
import re
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
            what = f"worker died{_death_cause(t)}"
        else:
            lines = [x for x in str(exc).splitlines() if x.strip()]
            what = f"failed ({(lines[-1] if lines else type(exc).__name__)[:200]})"
        step = self._step_of(Path(t["trial_dir"])) or 0
        log.warning("trial %s: %s, retrying from step %d", TrialSpec(**t["spec"]).label(), what, step)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ERRORS.last.pop(str(trial), None)  # its error is reported with the run's outcome


TAIL_LINES = 60  # of a dead worker's log, kept with its trial
FATAL = re.compile(r"^Fatal Python error: (.+)$", re.MULTILINE)


def ray_logs_dir() -> Path:
    """The log folder of the Ray session this process is connected to."""
    import ray

    context = ray.get_runtime_context()
    return Path(context.get_temp_dir()) / context.get_session_name() / "logs"


def _death_cause(t: dict[str, Any]) -> str:
    """" (<fatal error>; pid N)" from the end of the dead worker's Ray log, which is kept in the trial's run;
    " (pid N; no fatal error in its Ray log)" when it names none (a process killed from outside, e.g. by the OOM
    killer, writes nothing); "" when the log cannot be found (a worker on another node of a cluster)."""
    from bench import tracking

    try:
        pid = int((Path(t["trial_dir"]) / "worker.pid").read_text())
        logs = sorted(ray_logs_dir().glob(f"worker-*-{pid}.err"))
        if not logs:
            return ""
        tail = "\n".join(logs[-1].read_text(errors="replace").splitlines()[-TAIL_LINES:])
    except (OSError, ValueError):
        return ""
    if tail.strip():
        tracking.retry(lambda: tracking.client(t["tracking_uri"]).log_text(
            t["run_id"], f"{logs[-1]}\n\n{tail}\n", f"worker_death_{pid}.txt"))
    found = FATAL.findall(tail)
    return f" ({found[-1]}; pid {pid})" if found else f" (pid {pid}; no fatal error in its Ray log)"
