"""Leaderboards: one table per paper table/experiment, our numbers beside the papers', plus curves and sweep plots.

Cells aggregate the final headline metric of a task over seeds (mean ± sample std, or the interquartile mean with a
bootstrap interval for tasks that ask for it). Trials that diverged are shown as diverged, never as a number. Under
each title, the data its trials trained on (the tags and params a task logs: source, corpus tokens, passes), with
runs that make more than one pass over their data flagged.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import tracking
from bench.suite import Trial
from tasks.base import SummaryKind, summarise

PAPER_RESULTS = Path(__file__).parent / "reference" / "paper_results.yaml"


def paper_results() -> dict[str, Any]:
    return yaml.safe_load(PAPER_RESULTS.read_text())


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    diverged: int = 0
    missing: int = 0
    summary: SummaryKind = "mean"

    @property
    def seeds(self) -> int:
        return len(self.values) + self.diverged

    def center(self) -> float | None:
        s = summarise(self.summary, self.values)
        return None if s is None else s.center

    def spread(self) -> str:
        s = summarise(self.summary, self.values)
        if s is not None and s.interval is not None:
            return f" [{_fmt(s.interval[0])}, {_fmt(s.interval[1])}]"
        return f" ± {_fmt(s.std)}" if s is not None and s.std is not None else ""

    def text(self) -> str:
        if not self.values and self.diverged:
            return "diverged" + (f" ({self.diverged}/{self.seeds})" if self.seeds > 1 else "")
        center = self.center()
        if center is None:
            return "—" if not self.missing else "pending"
        note = f" ({self.diverged}/{self.seeds} diverged)" if self.diverged else ""
        return f"{_fmt(center)}{self.spread()}{note}"


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    mag = abs(x)
    return f"{x:.4g}" if mag < 1000 else f"{x:.0f}"


@dataclass
class Table:
    name: str
    metric: str
    mode: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    paper: dict[tuple[str, str], float]
    # The task's `paper_metric` where it differs from `metric` (the papers' estimator), shown beside ours, labelled.
    estimates: dict[tuple[str, str], Cell] = field(default_factory=dict)
    data: str = ""

    def header(self) -> list[str]:
        head = ["optimizer"]
        for col in self.columns:
            head.append(col)
            if self.estimates:
                head.append(f"{col} (papers' estimator)")
            if any((r, col) in self.paper for r in self.rows):
                head.append(f"{col} (paper)")
        return head + ["seeds"]

    def body(self) -> list[list[str]]:
        out = []
        for row in self.rows:
            line = [row]
            for col in self.columns:
                line.append(self.cells.get((row, col), Cell()).text())
                if self.estimates:
                    line.append(self.estimates.get((row, col), Cell()).text())
                if any((r, col) in self.paper for r in self.rows):
                    paper = self.paper.get((row, col))
                    line.append("" if paper is None else _fmt(paper))
            line.append(str(max((c.seeds for (r, _), c in self.cells.items() if r == row), default=0)))
            out.append(line)
        return out

    def markdown(self) -> str:
        head = self.header()
        title = f"### {self.name} — {self.metric} ({'lower' if self.mode == 'min' else 'higher'} is better)"
        if self.estimates:
            title += ("; ours exact, beside it the papers' estimator on the same batches, the one the papers' "
                      "numbers are compared with")
        lines = [title, ""]
        lines += [self.data, ""] if self.data else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.body()]
        return "\n".join(lines)

    def csv(self) -> str:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.header())
        writer.writerows(self.body())
        return buf.getvalue()


def _column(trial: Trial) -> str:
    if not trial.point:
        return trial.column
    return trial.column + " " + ",".join(f"{k}={v}" for k, v in sorted(trial.point.items()))


def build_tables(trials: list[Trial], runs: dict[str, Any]) -> list[Table]:
    """Group trials by table, row and column; read each trial's final metric from its run."""
    import tasks

    reference = paper_results()
    grouped: dict[str, list[Trial]] = defaultdict(list)
    for t in trials:
        grouped[t.table].append(t)
    tables = []
    for name, members in grouped.items():
        task = tasks.get_task(members[0].spec.task)
        metric = task.metric
        summary = task.summary
        rows = list(dict.fromkeys(t.row for t in members))
        columns = list(dict.fromkeys(_column(t) for t in members))
        paper_metric = task.paper_metric or metric
        cells: dict[tuple[str, str], Cell] = {}
        estimates: dict[tuple[str, str], Cell] = {}
        seen: set[tuple[str, str, str]] = set()
        for t in members:
            if (t.row, _column(t), t.key) in seen:
                continue
            seen.add((t.row, _column(t), t.key))
            run = runs.get(t.key)
            _add(cells.setdefault((t.row, _column(t)), Cell(summary=summary)), run, metric)
            if paper_metric != metric:
                _add(estimates.setdefault((t.row, _column(t)), Cell(summary=summary)), run, paper_metric)
        paper = {}
        for row, cols in (reference.get(name, {}).get("results") or {}).items():
            for col, value in cols.items():
                for c in columns:
                    if c == col or c.startswith(f"{col} "):
                        paper[(row, c)] = value
        tables.append(Table(name, metric, task.mode, rows, columns, cells, paper, estimates,
                            data_statement(members, runs)))
    return tables


def _add(cell: Cell, run: Any, metric: str) -> None:
    """Count a trial's final `metric` into `cell` (diverged, finished with a value, or missing)."""
    status = run.data.tags.get(tracking.STATUS_TAG) if run else None
    value = run.data.metrics.get(f"final.{metric}") if run else None
    if status == "diverged":
        cell.diverged += 1
    elif status == "finished" and value is not None:
        cell.values.append(value)
    else:
        cell.missing += 1


def data_statement(trials: list[Trial], runs: dict[str, Any]) -> str:
    """"Data: SOURCE, N tokens, P passes" for each distinct data setting of the trials' runs that state one."""
    seen: dict[tuple[str, str, str], bool] = {}
    for t in trials:
        run = runs.get(t.key)
        tags = run.data.tags if run else {}
        if "data_passes" in tags:
            key = (tags.get("data_source", "?"), run.data.params.get("data.corpus_tokens", "?"), tags["data_passes"])
            seen[key] = tags.get("data_epochs") == "multi-epoch"
    parts = []
    for (source, tokens, passes), multi in seen.items():
        size = f"{int(tokens) / 1e6:,.1f}M tokens" if tokens.isdigit() else f"{tokens} tokens"
        flag = " — **MULTI-EPOCH: more than one pass**" if multi else ""
        parts.append(f"{source} ({size}), {passes} passes{flag}")
    return "Data: " + "; ".join(parts) if parts else ""


def plot_curves(trials: list[Trial], runs: dict[str, Any], uri: str, out: Path) -> list[Path]:
    """One PNG per table and column: the headline metric's curve for each row, averaged over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import tasks

    c = tracking.client(uri)
    paths = []
    by_table: dict[str, list[Trial]] = defaultdict(list)
    for t in trials:
        by_table[t.table].append(t)
    for table, members in by_table.items():
        task = tasks.get_task(members[0].spec.task)
        metric = task.metric
        columns = list(dict.fromkeys(_column(t) for t in members))
        fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.4), squeeze=False)
        drew = False
        for ax, col in zip(axes[0], columns, strict=True):
            curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
            for t in members:
                run = runs.get(t.key)
                if _column(t) != col or run is None:
                    continue
                hist = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, metric))
                if hist:
                    curves[t.row].append(hist)
            for row, hists in curves.items():
                steps = sorted({s for h in hists for s, _ in h})
                mean = [statistics.fmean([dict(h)[s] for h in hists if s in dict(h)]) for s in steps]
                ax.plot(steps, mean, label=row)
                drew = True
            ax.set_title(col, fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(metric)
            if task.mode == "min" and metric.endswith("perplexity"):
                ax.set_yscale("log")
            if curves:
                ax.legend(fontsize=7)
        if drew:
            path = out / f"{table}_curves.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            paths.append(path)
        plt.close(fig)
    return paths


def plot_sweeps(tables: list[Table], out: Path) -> list[Path]:
    """For tables whose columns vary the learning rate: final metric against lr, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for table in tables:
        series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for (row, col), cell in table.cells.items():
            lr = _lr_of(col)
            center = cell.center()
            if lr is not None and center is not None:
                sd = statistics.stdev(cell.values) if len(cell.values) > 1 else 0.0
                series[row].append((lr, center, sd))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for row, pts in series.items():
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=row,
                        capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(table.metric)
        ax.set_title(table.name, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{table.name}_lr_sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _lr_of(column: str) -> float | None:
    for part in column.replace(" ", ",").split(","):
        if part.startswith("lr="):
            try:
                return float(part[3:])
            except ValueError:
                return None
    return None


def _histories(trials: list[Trial], runs: dict[str, Any], uri: str, metric: str) -> dict[str, list[tuple[int, float]]]:
    c = tracking.client(uri)
    out = {}
    for t in trials:
        run = runs.get(t.key)
        if run is not None and t.key not in out and run.data.tags.get(tracking.STATUS_TAG) == "finished":
            out[t.key] = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, metric))
    return out


def steps_to_reach(table: str, trials: list[Trial], runs: dict[str, Any], uri: str, baseline: str = "adam",
                   metric: str = "val_loss") -> str | None:
    """The papers' "same loss in fewer steps" figure: for each row and column, the first evaluation step at which
    the row's `metric` reaches the final `metric` of the `baseline` row of that column (mean over seeds)."""
    members = [t for t in trials if t.table == table]
    if not any(t.row == baseline for t in members):
        return None
    hist = _histories(members, runs, uri, metric)
    columns = list(dict.fromkeys(_column(t) for t in members))
    rows = list(dict.fromkeys(t.row for t in members))
    lines = [f"### {table} — steps to reach {baseline}'s final {metric} (lower is better)", "",
             "| optimizer | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = []
        for col in columns:
            target_runs = [hist[t.key] for t in members if t.row == baseline and _column(t) == col and hist.get(t.key)]
            mine = [hist[t.key] for t in members if t.row == row and _column(t) == col and hist.get(t.key)]
            if not target_runs or not mine:
                cells.append("—")
                continue
            target = statistics.fmean(h[-1][1] for h in target_runs)
            reached = [next((step for step, v in h if v <= target), None) for h in mine]
            hit = [r for r in reached if r is not None]
            total = max(h[-1][0] for h in mine)
            text = f"{statistics.fmean(hit):.0f} of {total}" if hit else f"not reached in {total}"
            if hit and len(hit) < len(reached):
                text += f" ({len(hit)}/{len(reached)} seeds)"
            cells.append(text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Tables whose paper claims a "same final loss in fewer steps" figure.
STEPS_TABLES = ("llm_pretrain_4bit",)


def write(trials: list[Trial], uri: str, experiment: str, out: Path, fmt: str = "md",
          parent_run_id: str | None = None) -> tuple[str, list[Path]]:
    """Build tables and plots for a suite's trials; write them under `out` (and to the parent run, if given)."""
    exp = tracking.client(uri).get_experiment_by_name(experiment)
    runs = tracking.trial_runs(uri, exp.experiment_id) if exp else {}
    tables = build_tables(trials, runs)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(t.markdown() if fmt == "md" else f"# {t.name}\n{t.csv()}" for t in tables)
    files = []
    for t in tables:
        (out / f"{t.name}.md").write_text(t.markdown() + "\n")
        (out / f"{t.name}.csv").write_text(t.csv())
        files += [out / f"{t.name}.md", out / f"{t.name}.csv"]
    sections = [t.markdown() for t in tables]
    for name in STEPS_TABLES:
        extra = steps_to_reach(name, trials, runs, uri)
        if extra:
            sections.append(extra)
            (out / f"{name}_steps_to_adam.md").write_text(extra + "\n")
            files.append(out / f"{name}_steps_to_adam.md")
            if fmt == "md":
                text += "\n\n" + extra
    from bench import analyses

    for section in analyses.run_analyses(trials, runs, uri, out):  # tables named spikes_*, memory_*, ...
        sections.append(section.markdown)
        files += section.files
        if fmt == "md":
            text += "\n\n" + section.markdown
    (out / "leaderboard.md").write_text("\n\n".join(sections) + "\n")
    files.append(out / "leaderboard.md")
    plain = [t for t in tables if analyses.analysis_for(t.name) is None]  # analyses draw their own sweeps
    files += plot_curves(trials, runs, uri, out) + plot_sweeps(plain, out)
    if parent_run_id:
        c = tracking.client(uri)
        for f in files:
            tracking.retry(lambda f=f: c.log_artifact(parent_run_id, str(f), "leaderboard"))
    return text, files
