"""The papers' analyses: leaderboard sections (a markdown table, most with a plot) that a suite names per table.

`ANALYSES` maps a name to its analysis; `leaderboard.write()` runs the analysis that a table's experiments name in
their `analysis` field, beside the usual table of final metrics. Analyses that compare with a row use the table's
`reference` row (Adam unless the suite names another). Seeds are aggregated as mean ± sample std (error bars); sweep
plots also show each seed's value and curves the min-max band over seeds. Only finished and diverged trials are read
(a diverged trial's curves end where it diverged, marked with an x; in sweeps it is an x at the top of the panel).

- ``spikes`` — gradient-spike statistics (SPAM's analysis; trials with ``spike_monitor: true``). A gradient entry
  spikes when its Gradient Spike Score GSS = |g| / mean of its past |g| exceeds the trial's ``spike_threshold`` (50;
  `optimizers.spike_monitor`). Per layer type: spikes summed over the run's log windows, and the largest GSS seen;
  the share of spiking entries is total spikes / (parameters × (steps − 1)), the first gradient having no GSS.
  Loss spikes: steps whose loss exceeds ``loss_spike_ratio`` (1.5) × the mean of the previous
  ``loss_spike_window`` (20) step losses (`tasks.llm_pretrain.stats`). Plots: spikes per layer type over steps,
  a heat map of spikes per layer (block) over steps (from the first seed's ``spikes_per_layer.csv``), and the
  loss curve with its loss spikes marked.
- ``memory`` — memory-efficient training: the headline metric beside the measured optimizer-state bytes (all
  tensors of the optimizer's state after its first step; the part held in integer index tensors shown apart),
  their ratio to the reference row's in the same column, and peak GPU memory (torch.cuda.max_memory_allocated;
  not measured on CPU, shown as such). Plot: metric against optimizer-state memory.
- ``sensitivity`` — final validation loss (the headline metric for tasks without one) against the grid value
  that varies in each column (learning rate, γ1, quant_bits, ...): one panel per column, one line per row.
- ``dynamics`` — training loss and gradient norm over steps for every row and grid point (e.g. Adam in BF16 and
  FP4 at several learning rates), one column of panels per table column.
- ``steps`` — the papers' "same loss in fewer steps" figure: for each row and column, the first evaluation step at
  which the row's validation loss reaches the reference row's final one (mean over seeds).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from bench.results import Cell, Results, column_label, fmt, markdown_table, mean_curve, pyplot, save_figure
from bench.suite import Trial

MIB = 2.0**20
LAYER_ORDER = ("embedding", "attention", "mlp", "norm", "head", "other")


@dataclass
class Section:
    """What one analysis adds to the leaderboard: markdown (also written to a file) and the files it wrote."""

    markdown: str
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Series:
    """One line of a plot: the trials of a table that share column, row and grid point (they differ by seed)."""

    column: str
    row: str
    point: tuple[tuple[str, Any], ...]

    def label(self, leave_out: Iterable[str] = ()) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.point if k not in set(leave_out))
        return f"{self.row} {extra}".strip()


@dataclass
class Analysis:
    """The trials of one table with the results of their runs."""

    table: str
    trials: list[Trial]
    results: Results
    out: Path

    @property
    def reference(self) -> str:
        return self.trials[0].reference

    @cached_property
    def series(self) -> dict[Series, list[Trial]]:
        """Trials by series, each trial once, in suite order."""
        out: dict[Series, list[Trial]] = {}
        for t in self.trials:
            s = Series(t.column, t.row, tuple(sorted(t.point.items())))
            members = out.setdefault(s, [])
            if all(m.key != t.key for m in members):
                members.append(t)
        return out

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(s.column for s in self.series))

    def write(self, suffix: str, markdown: str) -> Path:
        path = self.out / f"{self.table}_{suffix}.md"
        path.write_text(markdown + "\n")
        return path


# --- helpers -----------------------------------------------------------------------------------------------------


def _panels(n: int, rows: int = 1, width: float = 4.6, height: float = 3.4) -> tuple[Any, list[list[Any]]]:
    fig, axes = pyplot().subplots(rows, max(n, 1), figsize=(width * max(n, 1), height * rows), squeeze=False)
    return fig, [list(r) for r in axes]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _count(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _spread_text(values: list[float], fmt: Callable[[float], str] = fmt) -> str:
    """Mean ± std of the finite values, with a count of the non-finite ones."""
    finite = [v for v in values if math.isfinite(v)]
    bad = f" ({len(values) - len(finite)} non-finite)" if len(finite) < len(values) else ""
    if not finite:
        return "non-finite" if values else "—"
    mean, sd = _mean_sd(finite)
    return fmt(mean) + (f" ± {fmt(sd)}" if len(finite) > 1 else "") + bad


def _label_of(s: Series) -> str:
    return f"{s.column} / {s.label()}"


# --- spikes: gradient and loss spikes ------------------------------------------------------------------------


def _spike_totals(a: Analysis, t: Trial) -> dict[str, float]:
    """Per trial: spikes/<type> summed and max_gss/<type> maximised over the log windows; loss spikes."""
    run = a.results.run(t)
    out: dict[str, float] = {}
    for key in run.data.metrics:
        if key.startswith("spikes/"):
            out[key] = sum(v for _, v in a.results.history(t, key))
        elif key.startswith("max_gss/"):
            out[key] = max((v for _, v in a.results.history(t, key)), default=0.0)
    total = a.results.final(t, "loss_spikes_total")
    out["loss_spikes"] = total if total is not None else sum(v for _, v in a.results.history(t, "loss_spikes"))
    out["max_loss_ratio"] = max((v for _, v in a.results.history(t, "max_loss_ratio")), default=0.0)
    entries = (a.results.final(t, "n_params") or 0.0) * max((a.results.final(t, "steps") or 0.0) - 1, 0.0)
    if entries and "spikes/total" in out:
        out["share"] = out["spikes/total"] / entries
    return out


def _spike_row(s: Series, totals: list[dict[str, float]], types: list[str]) -> list[str]:
    def values(key: str) -> list[float]:
        return [d[key] for d in totals if key in d]

    def layer(kind: str) -> str:
        counts, tops = values(f"spikes/{kind}"), values(f"max_gss/{kind}")
        return f"{_spread_text(counts, _count)} (max {fmt(max(tops))})" if counts else "—"

    share = values("share")
    total = _spread_text(values("spikes/total"), _count) + (f" ({statistics.fmean(share):.2e})" if share else "")
    return [s.column, s.label(), total, *[layer(k) for k in types], _spread_text(values("loss_spikes"), _count),
            fmt(max(values("max_loss_ratio"), default=0.0)), str(len(totals))]


def spike_statistics(a: Analysis) -> Section:
    totals = {s: [_spike_totals(a, t) for t in a.results.done(ts)] for s, ts in a.series.items()}
    present = {k.split("/", 1)[1] for ds in totals.values() for d in ds for k in d if k.startswith("spikes/")}
    types = [k for k in LAYER_ORDER if k in present]
    thresholds = sorted({t.spec.config.get("spike_threshold", 50.0) for t in a.trials})
    head = ["column", "optimizer", "total (share of entries)", *[f"{k}: spikes (max GSS)" for k in types],
            "loss spikes", "max loss / recent mean", "seeds"]
    body = [_spike_row(s, ds, types) for s, ds in totals.items() if ds]
    note = ("" if types else "No gradient-spike metrics: the trials ran without `spike_monitor: true`. ") + (
        f"Gradient spike: GSS = |g| / mean of past |g| > {', '.join(fmt(x) for x in thresholds)}, summed over the "
        "run; loss spike: step loss > ratio × mean of the previous window of step losses.")
    markdown = markdown_table(f"### {a.table} — gradient spikes per layer type and loss spikes", head, body, [note])
    files = [a.write("spikes", markdown)]
    done = {s: a.results.done(ts) for s, ts in a.series.items() if a.results.done(ts)}
    if done and types:
        files += [_plot_spikes_over_steps(a, done, types), *_plot_spike_heatmap(a, done)]
    if done:
        files.append(_plot_loss_spikes(a, done))
    return Section(markdown, files)


def _plot_spikes_over_steps(a: Analysis, done: dict[Series, list[Trial]], types: list[str]) -> Path:
    fig, axes = _panels(len(done))
    for ax, (s, trials) in zip(axes[0], done.items(), strict=False):
        for kind in types:
            steps, mean, _, _ = mean_curve([a.results.history(t, f"spikes/{kind}") for t in trials])
            if steps:
                ax.plot(steps, mean, label=kind)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(_label_of(s), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("spikes per log window")
        ax.legend(fontsize=7)
    return save_figure(fig, a.out / f"{a.table}_spikes_over_steps.png")


def _layer_sort_key(layer: str) -> tuple[int, int, int]:
    parts = layer.split(".")
    if parts[0] == "layers" and len(parts) == 3:
        return (1, int(parts[1]), LAYER_ORDER.index(parts[2]) if parts[2] in LAYER_ORDER else 99)
    first = {"embedding": 0, "norm": 2, "head": 3}.get(layer, 4)
    return (first, 0, 0)


def spike_matrix(rows: list[dict[str, str]], max_bins: int = 200) -> tuple[list[str], list[int], list[list[float]]]:
    """Layers (in model order), bin end steps and spike counts[layer][bin] from per-layer CSV rows; windows are
    summed into at most `max_bins` bins of equal numbers of log windows."""
    steps = sorted({int(r["step"]) for r in rows})
    layers = sorted({r["layer"] for r in rows}, key=_layer_sort_key)
    per_bin = max(1, math.ceil(len(steps) / max_bins))
    bin_of = {step: i // per_bin for i, step in enumerate(steps)}
    n_bins = (len(steps) + per_bin - 1) // per_bin
    index = {layer: i for i, layer in enumerate(layers)}
    counts = [[0.0] * n_bins for _ in layers]
    for r in rows:
        counts[index[r["layer"]]][bin_of[int(r["step"])]] += float(r["spikes"])
    ends = [steps[min((b + 1) * per_bin, len(steps)) - 1] for b in range(n_bins)]
    return layers, ends, counts


def _plot_spike_heatmap(a: Analysis, done: dict[Series, list[Trial]]) -> list[Path]:
    import tasks

    layer_csv = tasks.get_task(a.trials[0].spec.task).statistics.get("layer_spikes")
    if layer_csv is None:
        return []
    matrices = {s: spike_matrix(rows) for s, ts in done.items() if (rows := a.results.artifact_csv(ts[0], layer_csv))}
    if not matrices:
        return []
    height = max(3.4, 0.12 * max(len(m[0]) for m in matrices.values()) + 1.5)
    fig, axes = _panels(len(matrices), width=5.2, height=height)
    for ax, (s, (layers, ends, counts)) in zip(axes[0], matrices.items(), strict=False):
        grid = [[math.log10(1.0 + c) for c in row] for row in counts]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(0, ends[-1], len(layers) - 0.5, -0.5))
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.set_xlabel("step")
        ax.set_title(f"{_label_of(s)} (seed {done[s][0].spec.seed})", fontsize=9)
        fig.colorbar(image, ax=ax, label="log10(1 + spikes)")
    return [save_figure(fig, a.out / f"{a.table}_spikes_heatmap.png")]


def _plot_loss_spikes(a: Analysis, done: dict[Series, list[Trial]]) -> Path:
    fig, axes = _panels(len(done))
    for ax, (s, trials) in zip(axes[0], done.items(), strict=False):
        steps, mean, lo, hi = mean_curve([a.results.history(t, "loss") for t in trials])
        ax.plot(steps, mean, color="C0", label="loss (mean over seeds)")
        if len(trials) > 1:
            ax.fill_between(steps, lo, hi, color="C0", alpha=0.2)
        loss_at = dict(zip(steps, mean, strict=True))
        marks = [(st, c) for t in trials for st, c in a.results.history(t, "loss_spikes") if c > 0 and st in loss_at]
        if marks:
            ax.scatter([m[0] for m in marks], [loss_at[m[0]] for m in marks], s=[12 + 8 * m[1] for m in marks],
                       color="C3", zorder=3, label="log window with loss spikes")
        total = sum(c for _, c in marks)
        ax.set_title(f"{_label_of(s)}: {total:g} loss spikes", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    return save_figure(fig, a.out / f"{a.table}_loss_spikes.png")


# --- memory: optimizer-state bytes, peak GPU memory and the headline metric ----------------------------------


def _mib(values: list[float]) -> str:
    return f"{statistics.fmean(values) / MIB:.1f} MiB" if values else "—"


def _reference_state(a: Analysis, column: str) -> float | None:
    """Mean optimizer-state bytes of the table's reference row in `column` (its first grid point with values)."""
    for s, trials in a.series.items():
        if s.column == column and s.row == a.reference:
            done = a.results.done(trials)
            values = [v for t in done if (v := a.results.final(t, "optimizer_state_bytes")) is not None]
            if values:
                return statistics.fmean(values)
    return None


def _peak_text(a: Analysis, trials: list[Trial]) -> str:
    values = [v for t in trials if (v := a.results.final(t, "peak_gpu_memory_bytes")) is not None]
    if values:
        return _mib(values)
    return "n/a (CPU run)" if trials else "—"


def memory_efficiency(a: Analysis) -> Section:
    import tasks

    task = tasks.get_task(a.trials[0].spec.task)
    head = ["column", "optimizer", task.metric, "optimizer state", f"vs {a.reference}", "of which index tensors",
            "peak GPU memory", "seeds"]
    body, points = [], []
    for s, trials in a.series.items():
        done = a.results.done(trials)
        state = [v for t in done if (v := a.results.final(t, "optimizer_state_bytes")) is not None]
        index = [v for t in done if (v := a.results.final(t, "optimizer_state_index_bytes")) is not None]
        reference = _reference_state(a, s.column)
        ratio = f"{statistics.fmean(state) / reference:.2f}×" if state and reference else "—"
        cell = a.results.cell(trials, task.metric)
        body.append([s.column, s.label(), cell.text(), _mib(state), ratio, _mib(index), _peak_text(a, done),
                     str(cell.seeds)])
        if state and cell.values:
            points.append((s, statistics.fmean(state) / MIB, *_mean_sd(cell.values)))
    note = ("Optimizer state: bytes of every tensor in the optimizer's state after its first step (integer index "
            "tensors, e.g. the kept-entry sets of sparse momentum, included and shown apart). Peak GPU memory: "
            "torch.cuda.max_memory_allocated over the run; not measured on CPU.")
    markdown = markdown_table(f"### {a.table} — {task.metric} against optimizer memory", head, body, [note])
    files = [a.write("memory", markdown)]
    if points:
        files.append(_plot_memory(a, points, task.metric))
    return Section(markdown, files)


def _plot_memory(a: Analysis, points: list[tuple[Series, float, float, float]], metric: str) -> Path:
    columns = list(dict.fromkeys(p[0].column for p in points))
    fig, axes = _panels(len(columns))
    for ax, column in zip(axes[0], columns, strict=False):
        for i, (s, mib, mean, sd) in enumerate(p for p in points if p[0].column == column):
            ax.errorbar([mib], [mean], yerr=[sd], marker="o", capsize=3, color=f"C{i % 10}", label=s.label())
            ax.annotate(s.label(), (mib, mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("optimizer state (MiB)")
        ax.set_ylabel(metric)
    return save_figure(fig, a.out / f"{a.table}_memory.png")


# --- sensitivity: final loss against the grid value that varies ----------------------------------------------


def _sweep_key(keys: set[str]) -> str | None:
    if not keys:
        return None
    return "lr" if "lr" in keys else sorted(keys)[0]


def _sensitivity_metric(a: Analysis) -> str:
    import tasks

    task = tasks.get_task(a.trials[0].spec.task)
    if any(a.results.final(t, "val_loss") is not None for t in a.trials):
        return "val_loss"
    return task.metric


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def sensitivity(a: Analysis) -> Section:
    metric = _sensitivity_metric(a)
    sections, panels = [], []
    for column in a.columns:
        members = {s: ts for s, ts in a.series.items() if s.column == column}
        key = _sweep_key({k for s in members for k, _ in s.point})
        if key is None:
            continue
        lines: dict[str, dict[Any, Cell]] = defaultdict(dict)
        for s, trials in members.items():
            if key in dict(s.point):
                lines[s.label(leave_out=[key])][dict(s.point)[key]] = a.results.cell(trials, metric)
        xs = sorted({x for cells in lines.values() for x in cells}, key=lambda v: (str(type(v)), v))
        body = [[label, *[cells[x].text() if x in cells else "—" for x in xs]] for label, cells in lines.items()]
        sections.append(markdown_table(f"#### {column}: final {metric} against {key}", ["optimizer", *map(str, xs)],
                                       body))
        panels.append((column, key, xs, lines))
    body = "\n\n".join(sections) or "No grid value varies within a column of this table: nothing to sweep."
    markdown = f"### {a.table} — sensitivity of the final {metric}\n\n{body}"
    files = [a.write("sweep", markdown)]
    if panels:
        files.append(_plot_sensitivity(a, panels, metric))
    return Section(markdown, files)


def _plot_sensitivity(a: Analysis, panels: list[tuple[str, str, list[Any], dict[str, dict[Any, Cell]]]],
                      metric: str) -> Path:
    fig, axes = _panels(len(panels))
    for ax, (column, key, xs, lines) in zip(axes[0], panels, strict=True):
        numeric = _numeric(xs)
        position = {x: (x if numeric else i) for i, x in enumerate(xs)}
        top = max((v for cells in lines.values() for c in cells.values() for v in c.values), default=1.0)
        for i, (label, cells) in enumerate(lines.items()):
            color = f"C{i % 10}"
            pts = [(position[x], *_mean_sd(c.values)) for x, c in cells.items() if c.values]
            pts.sort()
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, color=color, label=label)
            seeds = [(position[x], v) for x, c in cells.items() for v in c.values]
            ax.scatter([p[0] for p in seeds], [p[1] for p in seeds], s=10, color=color, alpha=0.45)
            diverged = [position[x] for x, c in cells.items() if c.diverged]
            if diverged:
                ax.scatter(diverged, [top] * len(diverged), marker="x", s=50, color=color,
                           label=f"{label} diverged")
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_title(column, fontsize=9)
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {metric}")
        ax.legend(fontsize=7)
    return save_figure(fig, a.out / f"{a.table}_sweep.png")


# --- dynamics: loss and gradient norm over training --------------------------------------------------------


def training_dynamics(a: Analysis, metrics: tuple[str, ...] = ("loss", "grad_norm")) -> Section:
    head = ["column", "series", "status", "final loss", "max grad norm", "loss spikes"]
    body = []
    for s, trials in a.series.items():
        done = a.results.done(trials)
        statuses = ", ".join(sorted({a.results.status(t) or "pending" for t in trials}))
        last = [h[-1][1] for t in done if (h := a.results.history(t, "loss"))]
        peaks = [v for t in done for _, v in a.results.history(t, "grad_norm") if math.isfinite(v)]
        spikes = [a.results.final(t, "loss_spikes_total") for t in done]
        body.append([s.column, s.label(), statuses, _spread_text(last), fmt(max(peaks)) if peaks else "—",
                     _spread_text([v for v in spikes if v is not None], _count)])
    markdown = markdown_table(f"### {a.table} — training loss and gradient norm", head, body)
    if not any(a.results.done(ts) for ts in a.series.values()):
        return Section(markdown, [a.write("dynamics", markdown)])
    fig, axes = _panels(len(a.columns), rows=len(metrics))
    for j, column in enumerate(a.columns):
        for i, metric in enumerate(metrics):
            _plot_dynamics_panel(axes[i][j], a, column, metric)
    return Section(markdown, [a.write("dynamics", markdown), save_figure(fig, a.out / f"{a.table}_dynamics.png")])


def _plot_dynamics_panel(ax: Any, a: Analysis, column: str, metric: str) -> None:
    """Mean curve over seeds with the min-max band; an x where a seed diverged (its last finite point)."""
    for k, (s, trials) in enumerate((s, ts) for s, ts in a.series.items() if s.column == column):
        color = f"C{k % 10}"
        steps, mean, lo, hi = mean_curve([a.results.history(t, metric) for t in a.results.done(trials)])
        if steps:
            ax.plot(steps, mean, color=color, marker=".", markersize=3, label=s.label())
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
        ends = [finite[-1] for t in trials if a.results.status(t) == "diverged"
                if (finite := [p for p in a.results.history(t, metric) if math.isfinite(p[1])])]
        if ends:
            ax.scatter([e[0] for e in ends], [e[1] for e in ends], marker="x", s=50, color=color,
                       label=f"{s.label()} diverged")
    if metric == "grad_norm":
        ax.set_yscale("log")
    ax.set_title(f"{column}: {metric}", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)


# --- steps: steps to reach the reference row's final loss -----------------------------------------------------


def steps_to_reach(a: Analysis, metric: str = "val_loss") -> Section | None:
    """For each row and column, the first evaluation step at which the row's `metric` reaches the final `metric` of
    the reference row of that column (mean over its finished seeds); None when the table has no reference row."""
    if not any(t.row == a.reference for t in a.trials):
        return None

    def curves(row: str, column: str) -> list[list[tuple[int, float]]]:
        return [h for t in a.trials if t.row == row and column_label(t) == column
                and a.results.status(t) == "finished" and (h := a.results.history(t, metric))]

    columns = list(dict.fromkeys(column_label(t) for t in a.trials))
    body = []
    for row in dict.fromkeys(t.row for t in a.trials):
        cells = []
        for column in columns:
            targets, mine = curves(a.reference, column), curves(row, column)
            if not targets or not mine:
                cells.append("—")
                continue
            target = statistics.fmean(h[-1][1] for h in targets)
            reached = [next((step for step, v in h if v <= target), None) for h in mine]
            hit = [r for r in reached if r is not None]
            total = max(h[-1][0] for h in mine)
            text = f"{statistics.fmean(hit):.0f} of {total}" if hit else f"not reached in {total}"
            if hit and len(hit) < len(reached):
                text += f" ({len(hit)}/{len(reached)} seeds)"
            cells.append(text)
        body.append([row, *cells])
    markdown = markdown_table(f"### {a.table} — steps to reach {a.reference}'s final {metric} (lower is better)",
                              ["optimizer", *columns], body)
    return Section(markdown, [a.write(f"steps_to_{a.reference}", markdown)])


# --- registry --------------------------------------------------------------------------------------------------

# A suite experiment's `analysis` field names one of these.
ANALYSES: dict[str, Callable[[Analysis], Section | None]] = {
    "spikes": spike_statistics,
    "memory": memory_efficiency,
    "sensitivity": sensitivity,
    "dynamics": training_dynamics,
    "steps": steps_to_reach,
}


def run_analyses(trials: list[Trial], results: Results, out: Path) -> list[Section]:
    """The sections of every table of `trials` whose suite names an analysis (tables without runs are skipped)."""
    sections = []
    for table in dict.fromkeys(t.table for t in trials):
        members = [t for t in trials if t.table == table]
        if members[0].analysis is None or not any(results.run(t) for t in members):
            continue
        section = ANALYSES[members[0].analysis](Analysis(table, members, results, out))
        if section is not None:
            sections.append(section)
    return sections
