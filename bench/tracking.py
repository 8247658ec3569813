"""MLflow tracking: where the store lives, one parent run per invocation, one child run per trial (keyed by hash),
and the MLflow UI server of `bench ui`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from bench.spec import TrialSpec

KEY_TAG = "bench.trial_key"
STATUS_TAG = "bench.status"
DONE_STATUSES = ("finished", "diverged")
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# MLflow 3 opens an experiment in its GenAI view unless this tag says it holds model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

T = TypeVar("T")


class StoreError(RuntimeError):
    """The tracking store cannot be used (malformed URI, unwritable folder); raised before any trial starts."""


class DiskFullError(OSError):
    """A write failed because its filesystem is full; the message names the filesystem."""

    def __init__(self, path: Path | str) -> None:
        mount = _mount_point(Path(path))
        super().__init__(errno.ENOSPC, f"no space left on the filesystem mounted at {mount} (writing {path}); "
                         "free some space there (or set BENCH_HOME to another disk) and run the same command to resume")


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() or (not os.path.ismount(path) and path != path.parent):
        path = path.parent
    return path


def is_disk_full(exc: BaseException) -> bool:
    """True for a full filesystem, whether seen by Python (ENOSPC) or reported by SQLite through MLflow."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "database or disk is full" in str(exc) or "No space left on device" in str(exc)


def home() -> Path:
    """The harness's working folder: `$BENCH_HOME`, default `./.bench` (MLflow store, checkpoints, artifacts)."""
    return Path(os.environ.get("BENCH_HOME", ".bench")).resolve()


def inside(folder: Path, *parts: str) -> Path:
    """`folder/parts...`, refused (ValueError) when the result would lie outside `folder`."""
    path = folder.joinpath(*parts).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"refusing to write {path}: it is outside {folder}")
    return path


def private_dir(path: Path) -> Path:
    """Create a folder (and its missing parents) readable by the user only."""
    for p in reversed([path, *path.parents]):
        if not p.exists():
            p.mkdir(mode=0o700, exist_ok=True)
    return path


def private_file(path: Path) -> int:
    """Open a file for writing (created or truncated) readable by the user only; returns the descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def default_tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlflow.db'}"


def is_local_uri(uri: str) -> bool:
    """True for stores that only one machine can write: SQLite files and plain folders."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError when a tracking server does not answer (before any trial starts)."""
    if is_local_uri(uri):
        return
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)  # noqa: S310 - the user's own server
    except OSError as exc:
        raise ConnectionError(f"tracking server {uri} does not answer ({exc})") from None


# Transient store errors, by a part of their message: SQLite's lock under concurrent writers, and an SQLAlchemy
# statement compiler found half-built ("'SQLiteCompiler' object has no attribute 'literal_execute_params'": twice in
# 125 trials written by twenty processes at once, at a tag write, each time restarting the trial from step 0).
TRANSIENT_STORE_ERRORS: tuple[str, ...] = ("database is locked", "'sqlitecompiler' object has no attribute")


def retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """Run a store call, retrying its transient errors (`TRANSIENT_STORE_ERRORS`) with exponential back-off."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow wraps SQLAlchemy errors in its own types
            message = str(exc).lower()
            if i == attempts - 1 or not any(s in message for s in TRANSIENT_STORE_ERRORS):
                raise
            time.sleep(0.2 * 2**i)
    raise AssertionError("unreachable")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def prepare_store(uri: str) -> None:
    """Create a local SQLite store's folder (and schema) in the driver, before trials race to do it. The folder and
    the database file are the user's only; a store whose creation never completed (e.g. the disk filled up) is
    set aside and created again."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    private_dir(db.parent)
    if db.exists() and _half_created(db):
        aside = db.with_name(f"{db.name}.incomplete-{int(time.time())}")
        db.replace(aside)
        logging.getLogger(__name__).warning("the tracking store %s was never completely created; set aside as %s "
                                            "and created again", db, aside.name)
    if not db.exists():
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))


def _half_created(db: Path) -> bool:
    """True for a SQLite file with some of MLflow's tables but no schema version: its creation was cut short."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            if not tables:
                return False
            if "alembic_version" not in tables:
                return True
            return con.execute("select count(*) from alembic_version").fetchone()[0] == 0
        finally:
            con.close()
    except sqlite3.Error:
        return False


def check_uri(uri: str) -> None:
    """StoreError for a tracking URI that names no store MLflow can use, ConnectionError for a server that does not
    answer (checked before anything is written)."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme and scheme not in ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks") \
            and "+" not in scheme:
        raise StoreError(f"--tracking-uri {short(uri)}: unsupported scheme {short(scheme, 40)}; use "
                         "sqlite:///PATH, http(s)://HOST:PORT (an MLflow server) or a database URL")
    if uri.startswith("sqlite:") and (not uri.startswith("sqlite:///") or uri == "sqlite:///"):
        raise StoreError(f"--tracking-uri {short(uri)}: a SQLite store is written sqlite:///PATH "
                         "(three slashes, then the path)")
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise _unwritable(uri, folder, "permission denied" if existing.is_dir() else f"{existing} is a file")
    check_reachable(uri)


def _unwritable(uri: str, folder: Path, why: str) -> StoreError:
    return StoreError(f"--tracking-uri {short(uri)}: cannot create the store's folder {short(str(folder))} ({why}); "
                      "pass a writable location, e.g. sqlite:///$HOME/bench/mlflow.db")


def check_store(uri: str) -> None:
    """Raise StoreError (or ConnectionError for a server that does not answer) unless the store can be used;
    a local store is created (or repaired) here."""
    check_uri(uri)
    try:
        prepare_store(uri)
        client(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - OSError from the folder, MLflow/SQLAlchemy errors from the store
        if is_disk_full(exc):
            raise DiskFullError(Path(uri.removeprefix("sqlite:///"))) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"the tracking store {short(uri)} cannot be used: {short(first, 300)}. Pass a writable "
                         "location, e.g. --tracking-uri sqlite:///$HOME/bench/mlflow.db, or a tracking server "
                         "http://HOST:PORT.") from None


def short(value: Any, limit: int = 200) -> str:
    """A value for an error message, cut to `limit` characters (never an unbounded repr)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlevel, r.maxlist, r.maxdict = 3, 8, 8
    text = value if isinstance(value, str) else r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def experiment_id(uri: str, name: str) -> str:
    """The id of an experiment, created if missing (artifacts of a local store go to $BENCH_HOME/artifacts)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) != v:  # stores written before the tag was set
                c.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    location = inside(home() / "artifacts", name).as_uri() if is_local_uri(uri) else None
    return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


LEADERBOARD_VIEW = "leaderboard"  # the MLflow UI opens it at /#/experiments/ID/runs?viewStateShareKey=leaderboard
LEADERBOARD_NAME = "Leaderboard"  # its name in the UI's list of saved views
UI_QUERY = "workflowType=machine_learning"  # MLflow 3's model-training pages (its UI starts in GenAI mode)
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # MLflow's experiment tag for a saved runs-page view


def set_leaderboard_view(uri: str, exp_id: str, metrics: list[str], lower_is_better: bool) -> None:
    """Save a runs-page view in the experiment: trial runs grouped by table, label and lr with the mean of the
    headline metrics (`final.<metric>`), sorted by the first; and describe it on the experiment page."""
    columns = [f"tags.`bench.{k}`" for k in ("table", "label", "optimizer", "status")]
    columns += ["params.`hparams.lr`", "params.`seed`"] + [f"metrics.`final.{m}`" for m in metrics]
    view = {
        "searchFilter": f"tags.`{KEY_TAG}` != ''", "orderByKey": f"metrics.`final.{metrics[0]}`",
        "orderByAsc": lower_is_better, "selectedColumns": columns,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [
            {"mode": "tag", "groupByData": "bench.table"}, {"mode": "tag", "groupByData": "bench.label"},
            {"mode": "param", "groupByData": "hparams.lr"}]},
    }
    c = client(uri)
    now = int(time.time() * 1000)  # MLflow 3's saved-view record, listed under the runs page's "Views" menu
    saved = {"name": LEADERBOARD_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(view)}
    retry(lambda: c.set_experiment_tag(exp_id, SHARED_VIEW_TAG + LEADERBOARD_VIEW, json.dumps(saved)))
    note = (f"Leaderboard: `bench ui` opens the Runs page on it in a browser that has not shown it before; pick "
            f"Views > {LEADERBOARD_NAME} (or the link `bench ui` prints) to come back to it: the trials grouped by "
            "table, row label and learning rate, with the mean of "
            + ", ".join(f"`final.{m}`" for m in metrics) + " over seeds. Each parent run holds the leaderboard "
            "tables as artifacts (`leaderboard/`).")
    retry(lambda: c.set_experiment_tag(exp_id, "mlflow.note.content", note))


def _leaderboard_views(uri: str) -> dict[str, tuple[str, str]]:
    """experiment id: (name, saved state of its leaderboard view) for every experiment of the store that has one."""
    views = {}
    for e in client(uri).search_experiments():
        with contextlib.suppress(ValueError, TypeError, KeyError):  # a view saved by other means is left alone
            state = json.loads(json.loads(e.tags[SHARED_VIEW_TAG + LEADERBOARD_VIEW])["state"])
            views[e.experiment_id] = (e.name, json.dumps(state))
    return views


def leaderboard_links(uri: str, base: str) -> list[str]:
    """`experiment: link` for every experiment of the store that has a leaderboard view."""
    return [f"{name}: {base}/#/experiments/{exp_id}/runs?{UI_QUERY}&viewStateShareKey={LEADERBOARD_VIEW}"
            for exp_id, (name, _) in _leaderboard_views(uri).items()]


# The page's first script sets what MLflow 3.17's UI reads from the browser's localStorage, only where the browser has
# no value yet (whatever the user changes later is kept):
# - the GenAI / model-training switch, which the UI takes from the address (UI_QUERY) or this setting, never from the
#   experiment's kind tag (mlflow/server/js/src/common/contexts/WorkflowTypeContext.tsx): model training;
# - an experiment's runs page, which restores its columns, grouping, filter and order from a per-experiment record
#   (common/utils/LocalStorageUtils.ts; experiment-page/hooks/useInitializeUIState.ts and
#   usePersistExperimentPageViewState.tsx): the leaderboard view, so the trials, their table, optimizer and headline
#   metric show on the first visit.
UI_SEED_SCRIPT = ('<script>try{{const s=(k,v)=>localStorage.getItem(k)||localStorage.setItem(k,v);'
                  's("mlflow.workflowType_v1",JSON.stringify("machine_learning"));const v={views};'
                  'for(const i in v)s("MLflowLocalStorage-1.1-ExperimentPage-"+JSON.stringify([i])+'
                  '"-ReactComponentState",v[i])}}catch(e){{}}</script>')
UI_APP = "bench-ui"  # the name of the server app of `bench ui` (`mlflow server --app-name bench-ui`)


def ui_seed_script(uri: str) -> bytes:
    """The page's first script for the store at `uri` (see UI_SEED_SCRIPT)."""
    try:
        views = {exp_id: state for exp_id, (_, state) in _leaderboard_views(uri).items()}
    except Exception as e:  # the page still opens, on MLflow's own runs-page defaults
        logging.getLogger(__name__).warning("no leaderboard views from %s: %s", uri, short(str(e)))
        views = {}
    return UI_SEED_SCRIPT.format(views=json.dumps(views).replace("<", "\\u003c")).encode()


class ModelTrainingFirst:
    """MLflow's server (ASGI) whose page opens on the model-training view in a browser that has not chosen one, also
    for experiments opened from the UI's list (their links carry no `workflowType`), and on an experiment's leaderboard
    view the first time the browser shows its runs; the UI's own switches still work."""

    def __init__(self, app: Callable[..., Any], uri: str) -> None:
        self.app = app
        self.uri = uri

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/":
            return await self.app(scope, receive, send)
        conditional = (b"if-none-match", b"if-modified-since", b"accept-encoding")  # always the full page, unzipped
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() not in conditional]}
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def rewrite(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start["status"] == 200:
                script = await asyncio.to_thread(ui_seed_script, self.uri)
                body = body.replace(b"<head>", b"<head>" + script, 1)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def ui_app() -> ModelTrainingFirst:
    """The server app of `bench ui` (`mlflow server --app-name bench-ui`): MLflow's own, opening on the
    model-training view and on a bench experiment's leaderboard view."""
    from mlflow.server import BACKEND_STORE_URI_ENV_VAR
    from mlflow.server.fastapi_app import app

    return ModelTrainingFirst(app, os.environ[BACKEND_STORE_URI_ENV_VAR])


class _UIAppPlugin(metadata.Distribution):
    """`ui_app` as MLflow's server finds apps: an `mlflow.app` entry point, known to this process only (for a checkout
    installed before pyproject.toml declared it, or not installed)."""

    def read_text(self, filename: str) -> str | None:
        return {"METADATA": f"Metadata-Version: 2.1\nName: {UI_APP}\nVersion: 0\n",
                "entry_points.txt": f"[mlflow.app]\n{UI_APP} = {__name__}:{ui_app.__name__}\n"}.get(filename)

    def locate_file(self, path: Any) -> Path:
        return Path(str(path))


class _UIAppFinder(metadata.DistributionFinder):
    def find_spec(self, *args: Any) -> None:  # imports nothing
        return None

    def find_distributions(self, context: Any = metadata.DistributionFinder.Context()) -> Iterator[_UIAppPlugin]:
        return iter([_UIAppPlugin()] if context.name in (None, UI_APP) else [])


def serve_ui(uri: str, host: str, port: int) -> None:
    """Run MLflow's server on the store with `ui_app` until it stops (Ctrl-C)."""
    if not metadata.entry_points(group="mlflow.app", name=UI_APP):
        sys.meta_path.append(_UIAppFinder())
    from mlflow.cli import cli  # after the finder: the CLI lists the apps it accepts when imported
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cli.main(["server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1",
              "--app-name", UI_APP], prog_name="mlflow")


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_tags() -> dict[str, str]:
    """Versions and hardware, recorded on every run."""
    tags = {"bench.git_commit": git_commit(), "bench.python": platform.python_version(),
            "bench.host_cpu": platform.machine()}
    for pkg in ("torch", "transformers", "ray", "mlflow", "stable-baselines3", "neuralforecast"):
        try:
            tags[f"bench.version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def device_tags(device: str) -> dict[str, str]:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return {"bench.device": torch.cuda.get_device_name(), "bench.cuda": str(torch.version.cuda)}
    return {"bench.device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}


def start_parent(uri: str, exp_id: str, name: str, tags: dict[str, str]) -> str:
    run = client(uri).create_run(exp_id, run_name=name, tags={**environment_tags(), **tags, "bench.role": "parent"})
    return run.info.run_id


def close_stale_parents(uri: str, exp_id: str) -> None:
    """Parent runs left RUNNING by a killed driver are closed as KILLED (their trials are adopted by the new one)."""
    c = client(uri)
    for run in c.search_runs([exp_id], filter_string="tags.`bench.role` = 'parent' and attributes.status = 'RUNNING'"):
        c.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
        c.set_terminated(run.info.run_id, status="KILLED")


def trial_runs(uri: str, exp_id: str) -> dict[str, Any]:
    """Existing child runs of an experiment by trial key (the newest one when a key appears twice)."""
    runs: dict[str, Any] = {}
    token = None
    c = client(uri)
    while True:
        page = c.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` != ''", max_results=5000, page_token=token,
                             order_by=["attributes.start_time ASC"])
        for run in page:
            runs[run.data.tags[KEY_TAG]] = run
        token = page.token
        if not token:
            return runs


def finished_keys(uri: str, experiment: str) -> set[str] | None:
    """Keys of the trials already done in `experiment`, read without writing anything: None when the store or the
    experiment does not exist yet (a missing local store is not created), or the store cannot be read."""
    local = uri.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:")
    if is_local_uri(uri) and not Path(local).exists():
        return None
    try:
        if not is_local_uri(uri):
            check_reachable(uri)
        exp = client(uri).get_experiment_by_name(experiment)
        runs = trial_runs(uri, exp.experiment_id) if exp is not None else None
    except Exception:  # noqa: BLE001 - an estimate without the store's state is still an estimate
        return None
    return None if runs is None else {k for k, r in runs.items() if r.data.tags.get(STATUS_TAG) in DONE_STATUSES}


def flat_params(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in values.items():
        text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        out[f"{prefix}{k}"] = text[:6000]
    return out


def trial_name(table: str, label: str, spec: TrialSpec) -> str:
    """How a trial is called in the MLflow UI and the terminal: its table, row label, learning rate and seed."""
    lr = spec.hparams.get("lr")
    lr_text = f" lr={lr:g}" if isinstance(lr, (int, float)) else f" lr={lr}" if lr is not None else ""
    return f"{table} {label}{lr_text} seed={spec.seed}"


def trial_tags(table: str, label: str, spec: TrialSpec) -> dict[str, str]:
    """The run name and the leaderboard place (table, row label) of a trial, as tags of its child run."""
    return {RUN_NAME_TAG: trial_name(table, label, spec), "bench.table": table, "bench.label": label}


def create_trial_run(uri: str, exp_id: str, parent_id: str, spec: TrialSpec, tags: dict[str, str]) -> str:
    """The child run of a trial; `tags` may name it (RUN_NAME_TAG, see `trial_tags`)."""
    c = client(uri)
    run = c.create_run(
        exp_id,
        run_name=tags.get(RUN_NAME_TAG, f"{spec.task} {spec.optimizer} seed={spec.seed}"),
        tags={
            PARENT_TAG: parent_id, KEY_TAG: spec.key(), STATUS_TAG: "pending", "bench.role": "trial",
            "bench.task": spec.task, "bench.preset": spec.preset, "bench.optimizer": spec.optimizer,
            "bench.seed": str(spec.seed), **{k: v for k, v in tags.items() if k != RUN_NAME_TAG},
        },
    )
    params = {"task": spec.task, "preset": spec.preset, "optimizer": spec.optimizer, "seed": str(spec.seed)}
    params |= flat_params("task.", spec.config) | flat_params("hparams.", spec.hparams)
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        retry(lambda chunk=items[i : i + 100]: client(uri).log_batch(run_id, params=chunk))


def log_metrics(uri: str, run_id: str, points: Iterable[tuple[int, str, float, int]]) -> None:
    """Write (step, key, value, timestamp_ms) points in batches."""
    from mlflow.entities import Metric

    items = [Metric(k, v, ts, step) for step, k, v, ts in points]
    for i in range(0, len(items), 1000):
        retry(lambda chunk=items[i : i + 1000]: client(uri).log_batch(run_id, metrics=chunk))


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Set tags of a run in batches (values as strings)."""
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(items), 100):
        retry(lambda chunk=items[i : i + 100]: client(uri).log_batch(run_id, tags=chunk))


def close_trial(uri: str, run_id: str, status: str, error: str) -> None:
    """End a trial's child run that did not finish: `interrupted` (KILLED, resumable) or `failed` (FAILED)."""
    set_tags(uri, run_id, {STATUS_TAG: status} | ({"bench.error": error[:5000]} if error else {}))
    retry(lambda: client(uri).set_terminated(run_id, status="KILLED" if status == "interrupted" else "FAILED"))


@contextlib.contextmanager
def run_lock(uri: str, command: str) -> Iterator[None]:
    """Hold BENCH_HOME (and a local store elsewhere) for one `bench run`/`sweep`; a second one gets StoreError
    naming the first (PID, command, since when). The OS drops the lock when its holder dies, even by kill -9."""
    import fcntl

    folders = [home()]
    if uri.startswith("sqlite:///"):  # the store's folder first: one that cannot exist fails before BENCH_HOME does
        folders.insert(0, Path(uri.removeprefix("sqlite:///")).parent)
    held = []
    try:
        for folder in dict.fromkeys(p.resolve() for p in folders):
            try:
                private_dir(folder)
            except OSError as exc:
                raise _unwritable(uri, folder, exc.strerror or str(exc)) from None
            path = folder / "bench.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 2000).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise StoreError(f"another bench run is using {folder}: {short(holder, 400)}. Wait for it to end, "
                                 "or give this one its own BENCH_HOME and --tracking-uri.") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"PID {os.getpid()}, `{short(command, 300)}`, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)


def adopt(uri: str, run_id: str, parent_id: str, tags: dict[str, str] | None = None) -> None:
    """Attach an existing unfinished trial run to the current parent run, with the run's `tags`."""
    set_tags(uri, run_id, {PARENT_TAG: parent_id, **(tags or {})})
