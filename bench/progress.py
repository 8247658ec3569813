"""Live progress of a suite in the terminal: a rich progress bar fed by Ray Tune's driver-side callbacks."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.spec import TrialSpec


class TrialProgress(Callback):
    """Counts finished trials and shows the latest step and loss of the running ones."""

    def __init__(self, console: Console, specs: list[TrialSpec]) -> None:
        self._labels = {s.key(): f"{s.task}:{s.optimizer} seed {s.seed}" for s in specs}
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console, transient=False)
        self._bar = self._progress.add_task("trials", total=len(specs))
        self._latest: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Ray Tune pickles its callbacks with the experiment state; the live display stays in the driver."""
        return {"_labels": self._labels, "_latest": {}}

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

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        key = self._key(trial)
        loss = result.get("loss", result.get("train_loss"))
        text = f"step {result.get('step', '?')}" + (f" loss {loss:.3g}" if isinstance(loss, float) else "")
        self._latest[key] = f"{self._labels.get(key, key)} {text}"
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        self._latest.pop(key, None)
        self._progress.console.log(f"done: {self._labels.get(key, key)}")
        self._progress.advance(self._bar)
        self._refresh()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        self._latest.pop(key, None)
        self._progress.console.log(f"[red]failed[/]: {self._labels.get(key, key)}")
        self._progress.advance(self._bar)
        self._refresh()
