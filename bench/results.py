"""A suite's results as the tracking store holds them, read once for the leaderboard and the analyses.

`Results` reads the trial runs of an experiment, their statuses, final metrics, metric histories (cached) and CSV
artifacts. `Results.outcome` is the one rule for what a trial counts as: finished with a value, diverged, failed or
missing. `Cell` summarises one table cell over seeds; `fmt`, `markdown_table`, `mean_curve`, `pyplot` and
`save_figure` are the number format, the markdown table, the mean curve over seeds and the figure backend and file
format that every table and plot of the leaderboard uses.
"""

from __future__ import annotations

import csv
import math
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from bench import tracking
from bench.suite import Trial
from tasks.base import SummaryKind, summarise

Outcome = Literal["finished", "diverged", "failed", "missing"]


def fmt(x: float) -> str:
    """A number as tables show it: 4 significant digits, whole numbers from 1000 on."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def column_label(t: Trial) -> str:
    """The trial's column as tables head it: its suite column, then the grid values that vary within it."""
    if not t.point:
        return t.column
    return t.column + " " + ",".join(f"{k}={v}" for k, v in sorted(t.point.items()))


def markdown_table(title: str, head: list[str], body: list[list[str]], notes: Iterable[str] = ()) -> str:
    """A titled markdown table; each note is a paragraph between the title and the table."""
    lines = [title, ""]
    for note in notes:
        lines += [note, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def mean_curve(hists: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, min and max over the histories that have a value at each step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for h in hists:
        for step, value in h:
            by_step[step].append(value)
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def pyplot() -> Any:
    """matplotlib's pyplot on the headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write a figure as every plot of the leaderboard is written, and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


@dataclass
class Cell:
    """One table cell: the final metric of its trials (seeds), the diverged ones counted apart."""

    values: list[float] = field(default_factory=list)
    diverged: int = 0
    missing: int = 0
    failed: int = 0  # trials that ended in an error (counted in `missing` too)
    summary: SummaryKind = "mean"

    @property
    def seeds(self) -> int:
        return len(self.values) + self.diverged

    def add(self, outcome: Outcome, value: float | None) -> None:
        if outcome == "diverged":
            self.diverged += 1
        elif outcome == "finished" and value is not None:
            self.values.append(value)
        else:
            self.missing += 1
            self.failed += outcome == "failed"

    def center(self) -> float | None:
        s = summarise(self.summary, self.values)
        return None if s is None else s.center

    def spread(self) -> str:
        s = summarise(self.summary, self.values)
        if s is not None and s.interval is not None:
            return f" [{fmt(s.interval[0])}, {fmt(s.interval[1])}]"
        return f" ± {fmt(s.std)}" if s is not None and s.std is not None else ""

    def text(self) -> str:
        if not self.values and self.diverged:
            return "diverged" + (f" ({self.diverged}/{self.seeds})" if self.seeds > 1 else "")
        center = self.center()
        if center is None:
            return "failed" if self.failed else "—" if not self.missing else "pending"
        note = f" ({self.diverged}/{self.seeds} diverged)" if self.diverged else ""
        return f"{fmt(center)}{self.spread()}{note}"


@dataclass
class Results:
    """The trial runs of one experiment by trial key; metric histories are fetched once each."""

    uri: str
    runs: dict[str, Any]
    _hist: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)

    @classmethod
    def load(cls, uri: str, experiment: str) -> Results:
        exp = tracking.client(uri).get_experiment_by_name(experiment)
        return cls(uri, tracking.trial_runs(uri, exp.experiment_id) if exp else {})

    @cached_property
    def client(self) -> Any:
        return tracking.client(self.uri)

    def run(self, t: Trial) -> Any:
        return self.runs.get(t.key)

    def status(self, t: Trial) -> str | None:
        run = self.run(t)
        return run.data.tags.get(tracking.STATUS_TAG) if run else None

    def final(self, t: Trial, metric: str) -> float | None:
        run = self.run(t)
        return run.data.metrics.get(f"final.{metric}") if run else None

    def outcome(self, t: Trial, metric: str) -> tuple[Outcome, float | None]:
        """What the trial counts as for its final `metric`: finished (with the value), diverged, failed or missing
        (not run, running, interrupted, or finished without the metric)."""
        status, value = self.status(t), self.final(t, metric)
        if status == "diverged":
            return "diverged", None
        if status == "finished" and value is not None:
            return "finished", value
        return ("failed" if status == "failed" else "missing"), None

    def cell(self, trials: Iterable[Trial], metric: str, summary: SummaryKind = "mean") -> Cell:
        """The final `metric` of `trials` (each counted as often as it is given) as one cell."""
        cell = Cell(summary=summary)
        for t in trials:
            cell.add(*self.outcome(t, metric))
        return cell

    def done(self, trials: list[Trial]) -> list[Trial]:
        """Finished and diverged trials (the ones whose metrics can be read)."""
        return [t for t in trials if self.status(t) in tracking.DONE_STATUSES]

    def history(self, t: Trial, metric: str) -> list[tuple[int, float]]:
        """(step, value) of `metric` over the trial's run, by step ([] without a run)."""
        key = (t.key, metric)
        if key not in self._hist:
            run = self.run(t)
            points = self.client.get_metric_history(run.info.run_id, metric) if run else []
            self._hist[key] = sorted((m.step, m.value) for m in points)
        return self._hist[key]

    def artifact_csv(self, t: Trial, name: str) -> list[dict[str, str]]:
        """Rows of a CSV artifact of the trial's run ([] when it has none)."""
        import mlflow.artifacts

        run = self.run(t)
        if run is None:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name, dst_path=tmp,
                                                           tracking_uri=self.uri)
            except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
                return []
            with open(path, newline="") as f:
                return list(csv.DictReader(f))
