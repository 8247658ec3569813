"""MLflow tracking: where the store lives, one parent run per invocation, one child run per trial (keyed by hash)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
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


def home() -> Path:
    """The harness's working folder: `$BENCH_HOME`, default `./.bench` (MLflow store, checkpoints, Ray logs)."""
    return Path(os.environ.get("BENCH_HOME", ".bench")).resolve()


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


def retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """Run a store call, retrying the transient 'database is locked' errors of SQLite under concurrent writers."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow wraps SQLAlchemy errors in its own types
            if i == attempts - 1 or "locked" not in str(exc).lower():
                raise
            time.sleep(0.2 * 2**i)
    raise AssertionError("unreachable")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def prepare_store(uri: str) -> None:
    """Create a local SQLite store's folder (and schema) in the driver, before trials race to do it."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def experiment_id(uri: str, name: str) -> str:
    """The id of an experiment, created if missing (artifacts of a local store go to $BENCH_HOME/artifacts)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) != v:  # stores written before the tag was set
                c.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    location = (home() / "artifacts" / name).as_uri() if is_local_uri(uri) else None
    return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


LEADERBOARD_VIEW = "leaderboard"  # the MLflow UI opens it at /#/experiments/ID/runs?viewStateShareKey=leaderboard
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
    retry(lambda: c.set_experiment_tag(exp_id, SHARED_VIEW_TAG + LEADERBOARD_VIEW, json.dumps(view)))
    note = (f"Leaderboard: add `&viewStateShareKey={LEADERBOARD_VIEW}` to this page's address (`bench ui` prints "
            "the link) for the trials grouped by table, row label and learning rate, with the mean of "
            + ", ".join(f"`final.{m}`" for m in metrics) + " over seeds. Each parent run holds the leaderboard "
            "tables as artifacts (`leaderboard/`).")
    retry(lambda: c.set_experiment_tag(exp_id, "mlflow.note.content", note))


def leaderboard_links(uri: str, base: str) -> list[str]:
    """`experiment: link` for every experiment of the store that has a leaderboard view."""
    c = client(uri)
    return [f"{e.name}: {base}/#/experiments/{e.experiment_id}/runs?{UI_QUERY}&viewStateShareKey={LEADERBOARD_VIEW}"
            for e in c.search_experiments() if SHARED_VIEW_TAG + LEADERBOARD_VIEW in e.tags]


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


def adopt(uri: str, run_id: str, parent_id: str) -> None:
    """Attach an existing unfinished trial run to the current parent run."""
    retry(lambda: client(uri).set_tag(run_id, PARENT_TAG, parent_id))
