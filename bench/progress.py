"""Live progress of a suite in the terminal: a rich progress bar fed by Ray Tune's driver-side callbacks."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from bench import tracking
from bench.suite import Trial


class TrialProgress(Callback):
    """Counts finished trials, shows the latest step and loss of the running ones, and prints one line per finished
    trial: its table, row label, learning rate, seed and headline metric."""

    def __init__(self, console: Console, trials: list[Trial]) -> None:
        import tasks

        self._labels: dict[str, str] = {}
        self._metrics: dict[str, str] = {}
        for t in trials:  # a trial shown in several tables is named after the first
            self._labels.setdefault(t.key, tracking.trial_name(t.table, t.row, t.spec))
            self._metrics.setdefault(t.key, tasks.get_task(t.spec.task).metric)
        self._progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console, transient=False)
        self._bar = self._progress.add_task("trials", total=len(self._labels))
        self._latest: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Ray Tune pickles its callbacks with the experiment state; the live display stays in the driver."""
        return {"_labels": self._labels, "_metrics": self._metrics, "_latest": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._progress = Progress(console=Console(quiet=True))
        self._bar = self._progress.add_task("trials", total=len(self._labels))

    def __enter__(self) -> TrialProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def _key(self, trial: Any) -> str:
        return trial.config["trial"]["key"]

    def _refresh(self) -> None:
        running = "; ".join(list(self._latest.values())[-3:])
        self._progress.update(self._bar, description=f"trials {running}" if running else "trials")

    def _finish(self, key: str, line: Text) -> None:
        self._latest.pop(key, None)
        self._progress.console.print(line)  # a Text: names and values are never read as markup or emoji codes
        self._progress.advance(self._bar)
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        key = self._key(trial)
        loss = result.get("loss", result.get("train_loss"))
        text = f"step {result.get('step', '?')}" + (f" loss {loss:.3g}" if isinstance(loss, float) else "")
        self._latest[key] = f"{self._labels.get(key, key)} {text}"
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        result = trial.last_result or {}
        status = result.get("bench_status", "finished")
        metric = self._metrics.get(key, "")
        value = result.get(f"final.{metric}".replace("/", "."))
        done = status == "finished"
        score = f": {metric} {value:.4g}" if isinstance(value, (int, float)) and done else ""
        self._finish(key, Text.assemble(("done: " if done else f"{status}: ", "green" if done else "yellow"),
                                        self._labels.get(key, key) + score))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        self._finish(key, Text.assemble(("failed: ", "red"), self._labels.get(key, key)))
