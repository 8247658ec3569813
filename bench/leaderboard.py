"""Leaderboards: one table per paper table/experiment, our numbers beside the papers', plus curves and sweep plots.

Cells aggregate the final headline metric of a task over seeds (mean ± sample std, or the interquartile mean with a
bootstrap interval for tasks that ask for it). Trials that diverged are shown as diverged, never as a number. Under
each title, the data its trials trained on (the tags and params a task logs: source, corpus tokens, passes), with
runs that make more than one pass over their data flagged.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import analyses, tracking
from bench.results import Cell, Results, column_label, fmt, markdown_table, mean_curve, pyplot, save_figure
from bench.suite import Trial

PAPER_RESULTS = Path(__file__).parent / "reference" / "paper_results.yaml"


def paper_results() -> dict[str, Any]:
    return yaml.safe_load(PAPER_RESULTS.read_text())


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
    notes: list[str] = field(default_factory=list)  # scale, model, and why a paper comparison is not like for like
    # The learning rate of each cell whose trials' grid varies it (their own hyperparameters), for the sweep plot.
    lrs: dict[tuple[str, str], float] = field(default_factory=dict)

    def best(self) -> set[tuple[str, str]]:
        """The (row, column) cells with the best value of their column (all of them on a tie)."""
        marked = set()
        for col in self.columns:
            centers = {r: c for r in self.rows if (c := self.cells.get((r, col), Cell()).center()) is not None}
            if len(centers) > 1:
                top = (min if self.mode == "min" else max)(centers.values())
                marked |= {(r, col) for r, c in centers.items() if c == top}
        return marked

    def header(self) -> list[str]:
        head = ["optimizer"]
        for col in self.columns:
            head.append(col)
            if self.estimates:
                head.append(f"{col} (papers' estimator)")
            if any((r, col) in self.paper for r in self.rows):
                head.append(f"{col} (paper)")
        return head + ["seeds"]

    def body(self, mark: str = "") -> list[list[str]]:
        """Rows of text cells; the best cell of each column is wrapped in `mark` (e.g. `**` for bold)."""
        best = self.best() if mark else set()
        out = []
        for row in self.rows:
            line = [row]
            for col in self.columns:
                text = self.cells.get((row, col), Cell()).text()
                line.append(f"{mark}{text}{mark}" if (row, col) in best else text)
                if self.estimates:
                    line.append(self.estimates.get((row, col), Cell()).text())
                if any((r, col) in self.paper for r in self.rows):
                    paper = self.paper.get((row, col))
                    line.append("" if paper is None else fmt(paper))
            line.append(str(max((c.seeds for (r, _), c in self.cells.items() if r == row), default=0)))
            out.append(line)
        return out

    def markdown(self) -> str:
        head = self.header()
        title = (f"### {self.name} — {self.metric} ({'lower' if self.mode == 'min' else 'higher'} is better; "
                 "best of each column in bold)")
        if self.estimates:
            title += ("; ours exact, beside it the papers' estimator on the same batches, the one the papers' "
                      "numbers are compared with")
        notes = ["\n".join(f"{n}  " for n in self.notes)] if self.notes else []
        return markdown_table(title, head, self.body(mark="**"), notes + ([self.data] if self.data else []))

    def long_rows(self) -> list[dict[str, Any]]:
        """One record per cell (ours and the paper's), for the long-format CSV."""
        best = self.best()
        out = []
        for row in self.rows:
            for col in self.columns:
                cell = self.cells.get((row, col), Cell())
                center = cell.center()
                out.append({"table": self.name, "metric": self.metric, "mode": self.mode, "source": "ours",
                            "row": row, "column": col, "value": "" if center is None else center,
                            "text": cell.text(), "seeds": cell.seeds, "diverged": cell.diverged,
                            "best": int((row, col) in best)})
                if (row, col) in self.paper:
                    value = self.paper[(row, col)]
                    out.append({"table": self.name, "metric": self.metric, "mode": self.mode, "source": "paper",
                                "row": row, "column": col, "value": value, "text": fmt(value)})
        return out

    def csv(self) -> str:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.header())
        writer.writerows(self.body())
        return buf.getvalue()


def build_tables(trials: list[Trial], results: Results) -> list[Table]:
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
        rows = list(dict.fromkeys(t.row for t in members))
        columns = list(dict.fromkeys(column_label(t) for t in members))
        paper_metric = task.paper_metric or metric
        by_cell: dict[tuple[str, str], list[Trial]] = {}
        for t in members:
            group = by_cell.setdefault((t.row, column_label(t)), [])
            if all(m.key != t.key for m in group):
                group.append(t)
        cells = {k: results.cell(g, metric, task.summary) for k, g in by_cell.items()}
        estimates = {k: results.cell(g, paper_metric, task.summary) for k, g in by_cell.items()
                     } if paper_metric != metric else {}
        lrs = {k: float(g[0].spec.hparams["lr"]) for k, g in by_cell.items() if "lr" in g[0].point}
        paper = {}
        for row, cols in (reference.get(name, {}).get("results") or {}).items():
            for col, value in cols.items():
                for c in columns:
                    if c == col or c.startswith(f"{col} "):
                        paper[(row, c)] = value
        notes = provenance(members, results.runs, compared=bool(paper))
        tables.append(Table(name, metric, task.mode, rows, columns, cells, paper, estimates,
                            data_statement(members, results.runs), notes, lrs))
    return tables


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


def _model_of(trial: Trial, tags: dict[str, str]) -> str:
    """What model a trial trained, from what its run recorded (or its config when it recorded nothing)."""
    if tags.get("model_source"):
        pretrained = {"true": "pretrained", "false": "randomly initialised"}.get(tags.get("model_pretrained", ""))
        return tags["model_source"] + (f" ({pretrained})" if pretrained else "")
    if tags.get("forecasting_model"):
        return f"{tags['forecasting_model']} trained from scratch"
    cfg = trial.spec.config
    if "model_size" in cfg:
        return f"LLaMA-{cfg['model_size']} trained from scratch"
    if "algo" in cfg:
        return f"{str(cfg['algo']).upper()} policy trained from scratch"
    return "not recorded"


def provenance(members: list[Trial], runs: dict[str, Any], compared: bool) -> list[str]:
    """What a table's numbers are: the scale (presets) and model of its trials and, when it has a paper column,
    why that comparison is not like for like (a scaled-down preset, fallback data, a model that is not pretrained)."""
    presets = list(dict.fromkeys(t.spec.preset for t in members))
    tags = {t.key: runs[t.key].data.tags for t in members if t.key in runs}
    ran = [t for t in members if t.key in tags] or members  # trials not run yet recorded no model
    models = list(dict.fromkeys(_model_of(t, tags.get(t.key, {})) for t in ran))
    notes = [f"Scale: preset {', '.join(presets)}. Model: {'; '.join(models)}."]
    if not compared:
        return notes
    reasons = []
    scaled = [p for p in presets if not p.startswith("paper")]
    if scaled:
        reasons.append(f"preset {', '.join(scaled)} is scaled down from the papers' runs")
    if any(tg.get("data_fallback") == "true" for tg in tags.values()):
        reasons.append("fallback data stood in for the papers' data sets")
    if any(tg.get("model_pretrained") == "false" for tg in tags.values()):
        reasons.append("the model was randomly initialised, where the papers fine-tune a pretrained one")
    if reasons:
        notes.append("Not like for like with the (paper) columns: " + "; ".join(reasons) + ".")
    return notes


def plot_curves(trials: list[Trial], results: Results, out: Path) -> list[Path]:
    """One PNG per table and column: the headline metric's curve for each row, averaged over seeds."""
    plt = pyplot()

    import tasks

    paths = []
    by_table: dict[str, list[Trial]] = defaultdict(list)
    for t in trials:
        by_table[t.table].append(t)
    for table, members in by_table.items():
        task = tasks.get_task(members[0].spec.task)
        metric = task.metric
        columns = list(dict.fromkeys(column_label(t) for t in members))
        fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.4), squeeze=False)
        drew = False
        for ax, col in zip(axes[0], columns, strict=True):
            curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
            for t in members:
                if column_label(t) == col and (hist := results.history(t, metric)):
                    curves[t.row].append(hist)
            for row, hists in curves.items():
                steps, mean, _, _ = mean_curve(hists)
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
            paths.append(save_figure(fig, out / f"{table}_curves.png"))
        else:
            plt.close(fig)
    return paths


def plot_sweeps(tables: list[Table], out: Path) -> list[Path]:
    """For tables whose grid varies the learning rate: final metric against the trials' lr, one line per optimizer."""
    plt = pyplot()

    paths = []
    for table in tables:
        series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for (row, col), cell in table.cells.items():
            lr = table.lrs.get((row, col))
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
        paths.append(save_figure(fig, out / f"{table.name}_lr_sweep.png"))
    return paths


def write(trials: list[Trial], uri: str, experiment: str, out: Path, fmt: str = "md",
          parent_run_id: str | None = None) -> tuple[str, list[Path]]:
    """Build tables and plots for a suite's trials; write them under `out` (and to the parent run, if given)."""
    results = Results.load(uri, experiment)
    tables = build_tables(trials, results)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(t.markdown() for t in tables)
    records = [r for t in tables for r in t.long_rows()]
    files = []
    for t in tables:
        (out / f"{t.name}.md").write_text(t.markdown() + "\n")
        (out / f"{t.name}.csv").write_text(t.csv())
        files += [out / f"{t.name}.md", out / f"{t.name}.csv"]
    sections = [t.markdown() for t in tables]
    for section in analyses.run_analyses(trials, results, out):  # the tables whose suite names an analysis
        sections.append(section.markdown)
        records += markdown_records(section.markdown)
        files += section.files
        if fmt == "md":
            text += "\n\n" + section.markdown
    (out / "leaderboard.md").write_text("\n\n".join(sections) + "\n")
    long_csv = long_format_csv(experiment, records)
    (out / "leaderboard.csv").write_text(long_csv)
    files += [out / "leaderboard.md", out / "leaderboard.csv"]
    if fmt == "csv":
        text = long_csv
    analysed = {t.table for t in trials if t.analysis}
    plain = [t for t in tables if t.name not in analysed]  # analyses draw their own sweeps
    files += plot_curves(trials, results, out) + plot_sweeps(plain, out)
    if parent_run_id:
        c = tracking.client(uri)
        for f in files:
            tracking.retry(lambda f=f: c.log_artifact(parent_run_id, str(f), "leaderboard"))
        for t in tables:  # MLflow shows these as sortable tables in the run's artifacts
            data = dict(zip(t.header(), map(list, zip(*t.body(), strict=True)), strict=True))
            tracking.retry(lambda t=t, data=data: c.log_table(parent_run_id, data, f"leaderboard/{t.name}.json"))
    return text, files


LONG_COLUMNS = ("experiment", "table", "metric", "mode", "source", "row", "column", "value", "text", "seeds",
                "diverged", "best")


def long_format_csv(experiment: str, records: list[dict[str, Any]], header: bool = True) -> str:
    """Every table in one CSV, one line per cell: ours (`source` ours, `best` 1 for the best of its column), the
    papers' (`source` paper) and the analyses' (`source` analysis, their cell text in `text`)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, LONG_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({"experiment": experiment, **r} for r in records)
    return buf.getvalue()


def markdown_records(markdown: str) -> list[dict[str, Any]]:
    """The cells of the markdown tables in a section (an analysis or the steps-to-reach table) as long records."""
    records: list[dict[str, Any]] = []
    title, head = "", []
    for line in markdown.splitlines():
        if line.startswith("#"):
            title, head = line.lstrip("# ").split(" — ")[0], []
        elif line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not head:
                head = cells
                continue
            for col, text in zip(head[1:], cells[1:], strict=False):
                try:
                    value: Any = float(text)
                except ValueError:
                    value = ""
                records.append({"table": title, "source": "analysis", "row": cells[0], "column": col,
                                "value": value, "text": text})
        elif not line.strip():
            head = []
    return records
