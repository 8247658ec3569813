"""The `bench` command: run suites and sweeps on Ray Tune, print leaderboards, open the MLflow UI, list plugins."""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from bench import mps, tracking

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Benchmark harness for spike-aware optimizers: the SPAM and Stable-SPAM experiments and your own.",
)
console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes get whole table rows
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
STATE: dict[str, bool] = {"debug": False}

TrackingOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking URI [default: sqlite:///$BENCH_HOME/mlflow.db, BENCH_HOME=./.bench]")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray cluster address (e.g. 127.0.0.1:6379); default: a new local Ray instance")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="override for every trial: task.FIELD=V, hparams.NAME=V, seeds=N or [..], preset=P")]
MpsMode = Enum("MpsMode", {m: m for m in mps.MODES}, type=str)  # type: ignore[misc]  # the choices of bench.mps
MpsOpt = Annotated[MpsMode, typer.Option(
    "--mps", help="trials sharing a GPU run their kernels side by side through "
    "an MPS server of this run (local runs on an NVIDIA GPU; auto: where it starts, else time-sliced)")]
OutOpt = Annotated[Path, typer.Option("--out", help="folder for leaderboard tables and plots")]
StallOpt = Annotated[float | None, typer.Option(
    "--stall-minutes", min=0.1, help="a trial that reports nothing this long is ended, its threads' stacks logged, "
    "and retried [default: bench.runner.RunOptions.stall_minutes]")]
AddOpt = Annotated[list[str] | None, typer.Option(
    "--add-optimizer", help="add a row to every table: NAME[:k=v,...], NAME a registry name, an entry point of "
    "bench.optimizers or module:Class; values as in a suite (a list is a grid axis)")]


def say(text: str | Text, to: Console = console) -> None:
    """Print text as it is: names, paths and values are never read as Rich markup or emoji codes."""
    to.print(text if isinstance(text, Text) else Text(text), highlight=False)


class UserError(Exception):
    """A problem with what the user asked for: reported as one paragraph, exit code 2, no traceback."""


def experiment_name(suite: str) -> str:
    return f"bench-{suite}"


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks and Ray's logs")] = False) -> None:
    STATE["debug"] = debug
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("optimizers", "tasks", "bench"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not debug:  # the progress bar alone: MLflow's INFO lines and Ray's notes on token authentication go
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (trials too)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)


def _uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri()


def _print_matrix(trials: list[Any], mps_mode: mps.Mode) -> None:
    from bench.estimate import describe_throughput, describe_wall_time, estimate

    table = RichTable(title=f"{len(trials)} trial cells")
    for col in ("table", "column", "row", "seed", "key", "gpus", "PFLOPs", "GPU-h"):
        table.add_column(col)
    est = {e.key: e for e in estimate(trials)}
    for t in trials:
        e = est[t.key]
        table.add_row(t.table, t.column + (" " + str(t.point) if t.point else ""), t.row, str(t.spec.seed),
                      t.key, f"{e.gpus:g}", f"{e.flops / 1e15:.3g}" if e.flops else "n/a",
                      f"{e.gpu_hours:.3g}" if e.flops else "n/a")
    console.print(table)
    total = sum(e.gpu_hours for e in est.values())
    cpu_bound = [e for e in est.values() if not e.flops]
    line = f"{len(est)} distinct trials; estimated {total:.2f} GPU-hours at {describe_throughput()}"
    if cpu_bound:
        cpu = sum(e.cpu_hours for e in cpu_bound)
        unknown = sum(1 for e in cpu_bound if not e.seconds)
        line += f"; {len(cpu_bound)} trials are not FLOP-bound: {cpu:.1f} CPU-hours"
        line += f" ({unknown} of them state no estimate)" if unknown else ""
    console.print(line)
    console.print(describe_wall_time(trials, mps_mode))


def _print_remaining(trials: list[Any], uri: str, experiment: str, mps_mode: mps.Mode) -> None:
    """What a run would still do: the trials the store already has done are skipped (read only; nothing written)."""
    from bench.estimate import describe_wall_time

    done = tracking.finished_keys(uri, experiment)
    if not done:
        return
    left = [t for t in trials if t.key not in done]
    distinct, left_keys = {t.key for t in trials}, {t.key for t in left}
    console.print(f"{len(distinct) - len(left_keys)} of {len(distinct)} distinct trials are already done in {uri} "
                  f"(experiment {experiment}); {len(left_keys)} left")
    if left:
        console.print("left: " + describe_wall_time(left, mps_mode))


def _run(suite_name: str, trials: list[Any], uri: str, address: str | None, max_concurrent: int,
         out: Path, command: str, mps_mode: mps.Mode, stall_minutes: float | None) -> int:
    import tasks
    from bench import leaderboard
    from bench.progress import TrialProgress
    from bench.runner import RunOptions, run_specs
    from bench.suite import unique_specs

    specs = unique_specs(trials)
    resources = {}
    for s in specs:
        task = tasks.get_task(s.task)
        r = task.resources(task.Config(**s.config))
        resources[s.key()] = {"cpus": r.cpus, "gpus": r.gpus, "workers": r.workers}
    trial_tags: dict[str, dict[str, str]] = {}
    for t in trials:  # a trial shown in several tables is named after the first
        trial_tags.setdefault(t.key, tracking.trial_tags(t.table, t.row, t.spec))
    opts = RunOptions(tracking_uri=uri, address=address, max_concurrent=max_concurrent, debug=STATE["debug"],
                      mps=mps_mode, trial_tags=trial_tags,
                      **({} if stall_minutes is None else {"stall_minutes": stall_minutes}))
    with TrialProgress(console, trials) as progress:
        summary = run_specs(specs, resources, experiment_name(suite_name), opts,
                            {"bench.suite": suite_name, "bench.command": command}, progress)
    metrics = list(dict.fromkeys(tasks.get_task(s.task).metric for s in specs))
    tracking.set_leaderboard_view(uri, summary.experiment_id, metrics, tasks.get_task(specs[0].task).mode == "min")
    parent = f", parent run {summary.parent_run_id}" if summary.parent_run_id else ""
    parent += f"; MPS {summary.mps}" if summary.mps else ""
    say(Text.assemble((suite_name, "bold"), f": {len(summary.started)} trials run, {len(summary.skipped)} already "
                      f"done (tracking: {uri}{parent})"))
    text, files = leaderboard.write(trials, uri, experiment_name(suite_name), tracking.inside(out, suite_name),
                                    parent_run_id=summary.parent_run_id)
    say(text)
    say(f"leaderboard written to {out / suite_name}/ ({len(files)} files)")
    return _report_outcome(summary, specs)


def _report_outcome(summary: Any, specs: list[Any]) -> int:
    """Statuses, resumed and unfinished trials; the exit code: 130 when interrupted, 1 when a trial failed."""
    labels = {s.key(): s.label() for s in specs}
    for key, step in summary.resumed.items():
        say(f"resumed {labels[key]} from step {step}")
    for key, message in summary.set_aside.items():
        say(f"warning: {labels[key]}: {message}", to=err)
    counts: dict[str, int] = {}
    for s in summary.statuses.values():
        counts[s] = counts.get(s, 0) + 1
    if counts:
        say("statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for key, error in summary.errors.items():
        say(f"{summary.statuses[key]}: {labels[key]}: {tracking.short(error, 300)}", to=err)
    if counts.get("interrupted"):
        say(f"interrupted: {counts['interrupted']} trials resumable — run the same command to resume", to=err)
        return 130
    return 1 if counts.get("failed") else 0


@app.command()
def run(
    suite: Annotated[str, typer.Option("--suite", "-s", help="suite name (see `bench list suites`) or a YAML path")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the trial matrix, GPU-hours and wall time, and "
                                          "what the store has already done; start nothing")]
    = False,
    address: AddressOpt = None,
    tracking_uri: TrackingOpt = None,
    max_concurrent: Annotated[int, typer.Option("--max-concurrent", min=0, help="0: as resources allow")] = 0,
    set_: SetOpt = None,
    add_optimizer: AddOpt = None,
    only: Annotated[str | None, typer.Option("--only", help="run part of the suite: tables or tasks, comma-separated")]
    = None,
    out: OutOpt = Path("results"),
    mps_mode: MpsOpt = MpsMode(mps.DEFAULT_MODE),
    stall_minutes: StallOpt = None,
) -> None:
    """Run every trial of a suite that is not finished yet, then print and save its leaderboard."""
    from bench.suite import load_trials, parse_sets

    names = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
    s, trials = load_trials(suite, parse_sets(set_ or []), add_optimizer, names)
    if dry_run:
        _print_matrix(trials, mps_mode.value)
        _print_remaining(trials, _uri(tracking_uri), experiment_name(s.name), mps_mode.value)
        return
    raise typer.Exit(_run(s.name, trials, _uri(tracking_uri), address, max_concurrent, out, " ".join(sys.argv),
                          mps_mode.value, stall_minutes))


DEFAULT_LRS = "1e-4,3e-4,1e-3"


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{what} must list positive numbers, got {text!r}")
    return values


@app.command()
def sweep(
    task: Annotated[str, typer.Option("--task", help="task name (see `bench list tasks`)")],
    optimizer: Annotated[str, typer.Option("--optimizer", help="one or more optimizer names (registry names, "
                                           "entry points of bench.optimizers, module:Class), comma-separated")],
    lr: Annotated[str | None, typer.Option("--lr", help="learning rates, comma-separated [default: each "
                                           f"optimizer's bench_lr_grid, else {DEFAULT_LRS}]")] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="seeds for the best lr of each optimizer")] = 3,
    preset: Annotated[str, typer.Option("--preset", help="task preset")] = "smoke",
    name: Annotated[str | None, typer.Option("--name", help="name of the sweep [default: sweep-TASK-PRESET-HASH]")]
    = None,
    address: AddressOpt = None,
    tracking_uri: TrackingOpt = None,
    max_concurrent: Annotated[int, typer.Option("--max-concurrent", min=0)] = 0,
    set_: SetOpt = None,
    out: OutOpt = Path("results"),
    mps_mode: MpsOpt = MpsMode(mps.DEFAULT_MODE),
    stall_minutes: StallOpt = None,
) -> None:
    """Learning-rate grid (seed 0), then the best lr of each optimizer re-run over N seeds."""
    from bench.suite import Experiment, Suite, apply_sets, expand, parse_sets

    opts = [o.strip() for o in optimizer.split(",") if o.strip()]
    lrs = sweep_lrs(opts, lr)
    sets = parse_sets(set_ or [])
    sweep_name = name or _sweep_name(task, preset, opts, lrs, seeds, sets)
    grid = apply_sets(Suite(name=sweep_name, experiments=[Experiment(
        task=task, preset=preset, table=f"{sweep_name}-grid", column=preset, hparams={"lr": lrs[o]},
        optimizers=[o], seeds=[0]) for o in opts]), sets)
    grid_trials = expand(grid)
    _save_sweep(grid, out)
    uri = _uri(tracking_uri)
    code = _run(sweep_name, grid_trials, uri, address, max_concurrent, out, " ".join(sys.argv), mps_mode.value,
                stall_minutes)
    if code == 130:
        raise typer.Exit(code)
    best = _best_lrs(grid_trials, uri, experiment_name(sweep_name))
    say("best learning rates: " + ", ".join(f"{o}={v}" for o, v in best.items()))
    if not best:
        raise UserError("every grid trial failed or diverged: no best learning rate to re-run")
    final = apply_sets(Suite(name=sweep_name, experiments=[
        Experiment(task=task, preset=preset, table=f"{sweep_name}-best", column=f"{preset} lr={lr_}",
                   hparams={"lr": lr_}, optimizers=[o], seeds=seeds) for o, lr_ in best.items()]), sets)
    trials = grid_trials + expand(final)
    _save_sweep(grid.model_copy(update={"experiments": grid.experiments + final.experiments}), out)
    code = max(code, _run(sweep_name, trials, uri, address, max_concurrent, out, " ".join(sys.argv), mps_mode.value,
                          stall_minutes))
    raise typer.Exit(code)


def sweep_lrs(opts: list[str], lr: str | None) -> dict[str, list[float]]:
    """Each optimizer's learning rates: `lr` if given, else its own `bench_lr_grid`, else `DEFAULT_LRS`."""
    from optimizers import OptimizerConfigError
    from optimizers.plugins import lr_grid

    try:
        return {o: _floats(lr, "--lr") if lr else lr_grid(o) or _floats(DEFAULT_LRS, "--lr") for o in opts}
    except OptimizerConfigError as exc:
        raise UserError(f"--optimizer {','.join(opts)!r}: {exc}") from None


def _sweep_name(task: str, preset: str, optimizers: list[str], lrs: dict[str, list[float]], seeds: int,
                sets: dict[str, Any]) -> str:
    """`sweep-TASK-PRESET-HASH`: sweeps over other optimizers, rates, seeds or settings keep their own results."""
    import hashlib
    import json

    body = json.dumps([sorted(optimizers), lrs, seeds, sets], sort_keys=True, default=str)
    return f"sweep-{task}-{preset}-{hashlib.sha256(body.encode()).hexdigest()[:6]}"


SWEEP_SUITE = "suite.yaml"  # a sweep's suite, saved beside its results so `bench leaderboard --suite NAME` finds it


def _save_sweep(suite: Any, out: Path) -> None:
    import yaml

    folder = tracking.inside(out, suite.name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_SUITE).write_text(yaml.safe_dump(suite.model_dump(mode="json"), sort_keys=False))


def _suite_ref(name: str, out: Path) -> str:
    """A suite name or path as `load_trials` takes it: a sweep's name becomes the suite file saved with its results."""
    from bench.suite import available

    saved = out / name / SWEEP_SUITE
    return str(saved) if name not in available() and saved.exists() else name


def _best_lrs(trials: list[Any], uri: str, experiment: str) -> dict[str, float]:
    import tasks
    from bench.results import Results

    results = Results.load(uri, experiment)
    best: dict[str, tuple[float, float]] = {}
    for t in trials:
        task = tasks.get_task(t.spec.task)
        outcome, value = results.outcome(t, task.metric)
        if outcome != "finished" or value is None:
            continue
        score = value if task.mode == "min" else -value
        if t.spec.optimizer not in best or score < best[t.spec.optimizer][0]:
            best[t.spec.optimizer] = (score, t.spec.hparams["lr"])
    return {o: v[1] for o, v in best.items()}


class Format(str, Enum):
    md = "md"
    csv = "csv"


@app.command(name="leaderboard")
def leaderboard_cmd(
    suite: Annotated[str | None, typer.Option("--suite", "-s", help="suite [default: every suite with runs]")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="terminal output format")] = Format.md,
    tracking_uri: TrackingOpt = None,
    set_: SetOpt = None,
    add_optimizer: AddOpt = None,
    out: OutOpt = Path("results"),
) -> None:
    """Comparison tables (ours beside the papers') and plots from the tracking store."""
    from bench import leaderboard
    from bench.suite import available, load_trials, parse_sets

    uri = _uri(tracking_uri)
    tracking.check_reachable(uri)
    sweeps = sorted(p.parent.name for p in out.glob(f"*/{SWEEP_SUITE}"))
    names = [suite] if suite else [
        n for n in available() + sweeps if _store_has(uri, experiment_name(n))
    ]
    if not names:
        raise UserError(f"no suite has runs in {uri}; run one first, e.g. `bench run --suite smoke`")
    for i, n in enumerate(names):
        s, trials = load_trials(_suite_ref(n, out), parse_sets(set_ or []), add_optimizer)
        if not _store_has(uri, experiment_name(s.name)):
            raise UserError(f"suite {s.name!r} has no runs in {uri}; run it first: bench run --suite {n}")
        text, files = leaderboard.write(trials, uri, experiment_name(s.name), tracking.inside(out, s.name),
                                        fmt=fmt.value)
        if fmt is Format.csv:  # stdout holds one long-format CSV and nothing else
            sys.stdout.write(text if i == 0 else text.split("\n", 1)[1])
        else:
            say(text)
        say(f"written to {out / s.name}/ ({len(files)} files)", to=err if fmt is Format.csv else console)


def _store_has(uri: str, experiment: str) -> bool:
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return False
    return tracking.client(uri).get_experiment_by_name(experiment) is not None


@app.command()
def ui(
    tracking_uri: TrackingOpt = None,
    host: Annotated[str, typer.Option("--host", help="interface to bind (loopback unless you say otherwise)")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 5000,
) -> None:
    """Start the MLflow UI on the tracking store (127.0.0.1:5000 by default)."""
    uri = _uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise UserError(f"no tracking store at {uri}; run a suite first, e.g. `bench run --suite smoke`")
    say(f"MLflow UI for {uri} on http://{host}:{port}/#/experiments?{tracking.UI_QUERY} (Ctrl-C to stop)")
    for link in tracking.leaderboard_links(uri, f"http://{host}:{port}"):
        say(f"leaderboard of {link}")
    sys.stdout.flush()
    tracking.serve_ui(uri, host, port)


PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


# Typer's own --help is off here so that `bench perf NAME --help` reaches the benchmark's option parser.
@app.command(context_settings={**PASS_THROUGH, "help_option_names": []})
def perf(ctx: typer.Context,
         what: Annotated[str | None, typer.Argument(help="what to time", metavar="optimizers|train")] = None) -> None:
    """Benchmarks: `optimizers` (one step on LLaMA parameter sets) or `train` (tokens/s and MFU of llm_pretrain).
    Further options go to the benchmark; `bench perf optimizers --help` and `bench perf train --help` list them."""
    if what in (None, "--help", "-h"):
        console.print(ctx.get_help())
        if what is None:
            raise UserError("name the benchmark: bench perf optimizers|train OPTIONS")
        return
    if what == "optimizers":
        from optimizers.benchmark import main as bench_main

        bench_main(ctx.args)
        return
    import tasks

    offered = {name: task for task in map(tasks.get_task, tasks.available()) for name in task.benchmarks}
    if what not in offered:
        raise UserError(f"unknown benchmark {what!r}; valid: {', '.join(['optimizers', *offered])}")
    offered[what].benchmark(what)(ctx.args)


class What(str, Enum):
    tasks = "tasks"
    optimizers = "optimizers"
    suites = "suites"


@app.command(name="list")
def list_cmd(what: Annotated[What, typer.Argument(help="what to list")]) -> None:
    """List the registered tasks, optimizers or suites."""
    if what is What.tasks:
        import tasks

        for name in tasks.available():
            t = tasks.get_task(name)
            say(f"{name}: metric {t.metric} ({t.mode}); presets: {', '.join(t.presets)}")
    elif what is What.optimizers:
        import optimizers

        for name in optimizers.available():
            spec = optimizers.spec(name)
            say(f"{name} [{spec.source}]: {', '.join(sorted(spec.accepts))}")
        say("components (combine as base+component+...):\n" + optimizers.specs.describe())
        for name, ep in optimizers.plugins.installed().items():
            say(f"{name} [entry point {ep.value}" + (f" of {ep.dist.name}" if ep.dist else "") + "]")
        say("your own: module:Class or module:factory, or an entry point of group bench.optimizers")
    else:
        from bench.suite import available, load

        for name in available():
            s, _, _ = load(name)
            say(f"{name}: {s.description.strip().splitlines()[0] if s.description else ''}")


def main() -> None:
    """Console entry point: known problems become one clear paragraph and exit code 2 (tracebacks with --debug)."""
    from pydantic import ValidationError

    from bench.runner import ClusterError
    from bench.suite import SuiteError

    try:
        code = app(standalone_mode=False)  # a command's `typer.Exit(code)` comes back as its return value
        sys.exit(code if isinstance(code, int) else 0)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except tracking.DiskFullError as exc:
        if STATE["debug"]:
            raise
        err.print(f"error: {exc.strerror}; unfinished trials are marked interrupted", highlight=False, markup=False)
        sys.exit(1)
    except (SuiteError, UserError, ClusterError, mps.MpsUnavailable, tracking.StoreError, ConnectionError, KeyError,
            ValidationError) as exc:
        if STATE["debug"]:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        say(Text.assemble(("error:", "bold red"), f" {msg}"), to=err)
        sys.exit(2)
    except Exception as exc:  # usage errors of typer's command-line parser: its own message, exit code 2
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            err.print("interrupted: run the same command to resume", highlight=False, markup=False)
            sys.exit(130)
        raise

if __name__ == "__main__":
    main()
