"""Orchestration: trials not yet finished in the MLflow store run as Ray Tune trials, each logging to its child run.

Resuming is by content hash: a trial whose child run says `finished` or `diverged` is skipped; any other existing
run for the key is adopted by the new parent run and its trial resumes from the checkpoint in its trial folder.

A trial whose task asks for several workers runs data-parallel: its Tune trial starts a Ray Train `TorchTrainer`
(DDP over NCCL on GPUs, gloo on CPUs) whose rank 0 logs and checkpoints exactly as a single-worker trial does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import mps, tracking
from bench.context import CHECKPOINT_STEP, SET_ASIDE_TAG, HarnessContext, ReplicaContext
from bench.spec import TrialSpec

log = logging.getLogger(__name__)

MPS_TAG = "bench.mps"  # on the parent run and every trial's run: whether the trials shared GPUs through MPS
# What the Tune trial of a data-parallel trial holds while its Ray Train workers run (Tune refuses an empty request).
DRIVER_CPUS = 0.01
_last_trial_end: float = 0.0  # when this worker process last finished a trial (Ray may reuse it for the next)


class ClusterError(RuntimeError):
    """The Ray cluster or the tracking store cannot serve this run (raised before any trial starts)."""


@dataclass
class RunOptions:
    tracking_uri: str
    address: str | None = None
    max_concurrent: int = 0  # 0: as many as resources allow
    max_failures: int = 2  # retries of a crashed trial (from its last checkpoint)
    debug: bool = False
    mps: mps.Mode = mps.DEFAULT_MODE  # trials sharing a GPU through this run's MPS server (bench.mps)
    # A trial that reports nothing for this long (hung: a deadlock, a stuck device call) is ended, its threads' stacks
    # in the log, and retried like a crashed one (`HarnessContext`). On one H200 a mini fine-tuning trial once hung
    # for good and held the run open (results/mini/finetune_fourteen.json); a working mini trial is silent longest in
    # its cold start (that run's GPU was idle for its first 115 s, fourteen trials compiling at once).
    stall_minutes: float = 20.0
    trial_tags: dict[str, dict[str, str]] = field(default_factory=dict)  # key -> name, table, label of its run


@dataclass
class RunSummary:
    parent_run_id: str | None  # None when every trial was already done
    experiment_id: str
    started: list[str] = field(default_factory=list)  # trial keys run by this invocation
    skipped: list[str] = field(default_factory=list)  # trial keys already done in the store
    statuses: dict[str, str] = field(default_factory=dict)  # key -> finished / diverged / failed / interrupted
    resumed: dict[str, int] = field(default_factory=dict)  # key -> the step a resumed trial started from
    errors: dict[str, str] = field(default_factory=dict)  # key -> why a trial failed or was interrupted
    set_aside: dict[str, str] = field(default_factory=dict)  # key -> a file the trial could not use, and why
    mps: str = ""  # how the trials shared their GPUs (`MpsState.describe`); "" when none ran


def dispatch_order(specs: list[TrialSpec]) -> list[TrialSpec]:
    """The order Tune starts trials in: the first trial of each task configuration (task and resolved config: what
    its optimizer, hyperparameters and seed leave the same), then the rest, each in suite order.

    A configuration's first trial on a machine pays what later ones find done: compiling its graphs into
    torch.compile's on-disk caches, building its data and model caches, the fine-tuning task's shared start scores.
    Started with the other configurations' first trials, it pays that while the GPU waits for the run's start anyway,
    and a table's trials, when their turn comes, start warm instead of all paying it at once with the GPU idle. On an
    H200, fourteen LoRA trials compiling together took ~160 s for their first ten steps and a later one 18 s
    (results/mini/finetune_tf32.json); a BF16 mini LLaMA trial of a first wave compiled in 43 s, twenty at once, and
    in 2-5 s from the caches (results/mini/README.md). In a whole-suite run the fine-tuning trials after the first two
    took 89-130 s (full) and 164-270 s (LoRA) against 111 s and 344 s before (results/mini/suite_wall.json).
    """
    firsts: dict[tuple[str, str], int] = {}
    for i, spec in enumerate(specs):
        firsts.setdefault((spec.task, json.dumps(spec.config, sort_keys=True, default=str)), i)
    chosen = set(firsts.values())
    return [specs[i] for i in firsts.values()] + [s for i, s in enumerate(specs) if i not in chosen]


def trial_dir(key: str, run_id: str) -> Path:
    """A trial's checkpoint folder. It belongs to one child run, so a new run (of another experiment, or after the
    store was lost) never inherits another run's progress; it is removed once its trial is done."""
    return tracking.inside(tracking.home() / "trials", f"{key}-{run_id}")


def _device(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def run_trial(trial: dict[str, Any], tune_report: bool = True, device: str | None = None) -> dict[str, Any]:
    """Run one trial to its end; the body of every Ray Tune trial (and of rank 0 of a data-parallel one).
    Returns the final metrics and `bench_status`."""
    import tasks
    from tasks.base import Diverged

    global _last_trial_end
    entered = time.time()
    started = max(_process_start(), _last_trial_end)
    spec = TrialSpec(**trial["spec"])
    uri, run_id = trial["tracking_uri"], trial["run_id"]
    ctx = HarnessContext(uri, run_id, Path(trial["trial_dir"]), spec.seed, device or _device(trial["gpus"]),
                         tune_report=tune_report, stall_s=trial.get("stall_s", 0.0))
    c = tracking.client(uri)
    tracking.retry(lambda: c.update_run(run_id, status="RUNNING"))  # a retried or resumed run runs again
    tracking.retry(lambda: c.set_tag(run_id, tracking.STATUS_TAG, "running"))
    ctx.set_tags(**tracking.device_tags(ctx.device), **{"bench.worker_pid": str(os.getpid())})
    task = tasks.get_task(spec.task)
    try:
        final = task.run(task.Config(**spec.config), spec.optimizer, spec.hparams, ctx)
        status, reason = "finished", ""
    except Diverged as exc:
        final, status, reason = dict(ctx.last_metrics), "diverged", str(exc)
    except BaseException as exc:
        ctx.unwatch()
        ctx.flush()
        # Ctrl-C reaches a trial as KeyboardInterrupt, or as SystemExit when Ray ends the stopped trial's actor
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit, tracking.DiskFullError))
        ctx.set_tags(**{tracking.STATUS_TAG: "interrupted" if interrupted else "failed",
                        "bench.error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracking.retry(lambda: c.log_text(run_id, traceback.format_exc(), "error.txt"))
        raise
    ctx.flush()
    ctx.upload_artifacts()
    finals = {f"final.{k}": float(v) for k, v in final.items() if isinstance(v, (int, float))}
    finals["diverged"] = float(status == "diverged")
    _last_trial_end = time.time()
    # where a trial's wall time goes: the worker's start (process, imports) before the task, and the task itself
    finals.update({"time.worker_start_s": entered - started, "time.task_s": _last_trial_end - entered})
    finals.update(_host_memory())
    tracking.log_metrics(uri, run_id, [(int(ctx.last_metrics.get("step", 0)), k, v, 0) for k, v in finals.items()])
    ctx.set_tags(**{tracking.STATUS_TAG: status, **({"bench.diverged_reason": reason[:5000]} if reason else {})})
    tracking.retry(lambda: c.set_terminated(run_id, status="FINISHED"))
    ctx.close()
    result = {**{k.replace("/", "."): v for k, v in finals.items()}, "bench_status": status}
    if tune_report:
        from ray import tune

        tune.report(result)
    return result


def _host_memory() -> dict[str, float]:
    """The worker's peak resident memory so far (a reused worker's trials share it) and the host's memory still
    available at the trial's end, in GiB: what many trials on one host leave each other."""
    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes
    return {"mem.worker_peak_rss_gib": peak / 2**30,
            "mem.host_available_gib": psutil.virtual_memory().available / 2**30}


def _process_start() -> float:
    """When this process was created (epoch seconds)."""
    import psutil

    return psutil.Process().create_time()


def run_replica(trial: dict[str, Any], device: str) -> dict[str, Any]:
    """Rank > 0 of a data-parallel trial: the same training, with nothing logged."""
    import tasks
    from tasks.base import Diverged

    spec = TrialSpec(**trial["spec"])
    task = tasks.get_task(spec.task)
    ctx = ReplicaContext(Path(trial["trial_dir"]), spec.seed, device)
    try:
        task.run(task.Config(**spec.config), spec.optimizer, spec.hparams, ctx)
    except Diverged:
        return {"bench_status": "diverged"}
    return {"bench_status": "finished"}


def fit_to_cluster(specs: list[TrialSpec], resources: dict[str, dict[str, float]],
                   cluster: dict[str, float]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Trial requests a local Ray instance can serve, and notes on what changed. On a cluster without GPUs, trials
    run on CPUs; CPU requests shrink to the cluster's CPUs; a data-parallel worker takes a whole GPU. A trial that
    needs more GPUs than the cluster has is an error (a local instance does not grow)."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    fitted, notes, too_big = {}, [], []
    on_cpu = 0
    for spec in specs:
        r = {"workers": 1, **resources[spec.key()]}
        workers = int(r["workers"])
        if r["gpus"] and not gpus:
            r["gpus"], on_cpu = 0.0, on_cpu + 1
        if r["gpus"] and workers > 1:
            r["gpus"] = float(math.ceil(r["gpus"]))  # NCCL needs one device per rank
        r["cpus"] = min(r["cpus"], cpus if workers == 1 else (cpus - DRIVER_CPUS) / workers)
        if r["gpus"] * workers > gpus:
            too_big.append(f"{spec.task} {spec.optimizer} seed {spec.seed} ({spec.key()}) needs "
                           f"{r['gpus'] * workers:g} GPUs ({workers} workers)")
        fitted[spec.key()] = r
    if too_big:
        raise ClusterError(f"the Ray cluster has {gpus:g} GPUs, too few for {len(too_big)} trial(s): "
                           + "; ".join(too_big[:5]) + ". Run them on a larger cluster (--address) or with fewer "
                           "data-parallel workers (--set task.workers=1).")
    if on_cpu:
        notes.append(f"no GPU in the Ray cluster: {on_cpu} trial(s) that ask for GPUs run on CPUs")
    return fitted, notes


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a Ray address (ray.init would retry for minutes)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"could not connect to Ray at {address}: nothing answers there ({exc}). Start the head "
                           "node with `ray start --head --node-ip-address=127.0.0.1` or leave out --address.") from None


def _use_cluster_token() -> None:
    """Authenticate as `ray start --head` decided: with the token of this machine (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) unless RAY_AUTH_MODE says otherwise. Ray's own client does this only
    for `address="auto"`, so a cluster started with Ray's defaults would refuse an explicit address."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray release without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _connect_hint(exc: BaseException) -> str:
    """Ray's reason for a failed connection, with the fix for a token the cluster refused."""
    text = f"{exc} {exc.__cause__ or ''}"
    if "InvalidAuthToken" not in text and "AuthenticationError" not in type(exc.__cause__).__name__:
        return str(exc)
    return ("the cluster uses token authentication and refused this machine's token. Copy the head node's token "
            "(`ray get-auth-token` there) to ~/.ray/auth_token here, or export RAY_AUTH_TOKEN=<token>, and run again "
            "(with RAY_AUTH_MODE=token if you set RAY_AUTH_MODE).")


# A local Ray instance's sockets lie at DIR/session_<date>_<pid>/sockets/plasma_store[.N]: about 70 bytes after DIR,
# under the 107 a Unix socket path may have (ray/_private/utils.py: validate_socket_filepath, Ray 2.60).
RAY_SOCKET_ROOM = 70
UNIX_SOCKET_PATH_MAX = 107


def ray_temp_dir() -> Path | None:
    """Where a new local Ray instance keeps its session (logs, sockets): $BENCH_HOME/ray when that path is short
    enough for Ray's Unix sockets, else None (Ray's default, /tmp/ray)."""
    path = tracking.home() / "ray"
    return path if len(str(path).encode()) + RAY_SOCKET_ROOM <= UNIX_SOCKET_PATH_MAX else None


def _init_ray(opts: RunOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    if opts.address:
        check_ray_address(opts.address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": opts.debug,
                              "logging_level": logging.INFO if opts.debug else logging.WARNING}
    try:
        if opts.address:
            _use_cluster_token()
            ray.init(address=opts.address, **kwargs)
        else:
            if (temp := ray_temp_dir()) is not None:
                kwargs["_temp_dir"] = str(temp)
            ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)  # never a cluster found on disk
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError or its own types
        raise ClusterError(f"could not connect to Ray at {opts.address or 'a new local instance'}: "
                           f"{_connect_hint(exc)}") from None
    from bench.retries import ray_logs_dir

    log.info("Ray's logs: %s", ray_logs_dir())
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and tracking.is_local_uri(opts.tracking_uri):
        ray.shutdown()
        raise ClusterError(
            f"the Ray cluster has {len(nodes)} nodes, but the tracking store {opts.tracking_uri} is a local file that "
            "trials on other nodes cannot write. Start a tracking server (e.g. `mlflow server --host 127.0.0.1`) "
            "reachable from every node and pass --tracking-uri http://HOST:PORT."
        )


def prepare(specs: list[TrialSpec], experiment: str, opts: RunOptions) -> tuple[str, dict[str, Any]]:
    """Check the store can be used (creating or repairing a local one) and look up what is already done."""
    tracking.check_store(opts.tracking_uri)
    exp_id = tracking.experiment_id(opts.tracking_uri, experiment)
    return exp_id, tracking.trial_runs(opts.tracking_uri, exp_id)


def run_specs(specs: list[TrialSpec], resources: dict[str, dict[str, float]], experiment: str, opts: RunOptions,
              parent_tags: dict[str, str], progress: Any = None) -> RunSummary:
    """Run every spec not finished yet under one new parent run. `resources[key]` = {"cpus": .., "gpus": ..}.
    One run at a time holds BENCH_HOME and the store (a second one gets StoreError naming the first)."""
    tracking.check_uri(opts.tracking_uri)  # a malformed or unwritable store fails before Ray starts
    mps.refuse_unavailable(opts.mps, local=not opts.address)  # `--mps on` where it cannot work: before anything
    if opts.address:  # a cluster that does not answer fails before anything is written
        _init_ray(opts)
    with tracking.run_lock(opts.tracking_uri, parent_tags.get("bench.command", experiment)):
        return _run_locked(specs, resources, experiment, opts, parent_tags, progress)


def _run_locked(specs: list[TrialSpec], resources: dict[str, dict[str, float]], experiment: str, opts: RunOptions,
                parent_tags: dict[str, str], progress: Any) -> RunSummary:
    exp_id, existing = prepare(specs, experiment, opts)
    uri = opts.tracking_uri
    done = {k for k, r in existing.items() if r.data.tags.get(tracking.STATUS_TAG) in tracking.DONE_STATUSES}
    todo = dispatch_order([s for s in specs if s.key() not in done])
    tracking.close_stale_parents(uri, exp_id)
    skipped = [s.key() for s in specs if s.key() in done]
    summary = RunSummary(None, exp_id, skipped=skipped)
    if not todo:  # nothing to run, so no parent run: an empty one would only clutter the experiment
        return summary
    with mps.for_run(opts.mps, local=not opts.address) as state:
        summary.mps = state.describe()
        tags = {**parent_tags, MPS_TAG: summary.mps}
        return _run_todo(todo, existing, resources, experiment, exp_id, opts, tags, progress, summary)


def _run_todo(todo: list[TrialSpec], existing: dict[str, Any], resources: dict[str, dict[str, float]],
              experiment: str, exp_id: str, opts: RunOptions, parent_tags: dict[str, str], progress: Any,
              summary: RunSummary) -> RunSummary:
    """Start Ray (through the run's MPS server when there is one), the parent run, and the trials under it."""
    _init_ray(opts)
    if not opts.address:  # a cluster may grow; a local instance has what it has
        import ray

        resources, notes = fit_to_cluster(todo, resources, ray.cluster_resources())
        for note in notes:
            log.warning(note)
    uri = opts.tracking_uri
    summary.parent_run_id = parent = tracking.start_parent(uri, exp_id, parent_tags.get("bench.suite", experiment),
                                                           parent_tags)
    status = "FAILED"
    try:
        summary.started = [s.key() for s in todo]
        _tune(todo, existing, resources, exp_id, parent, opts, progress, summary, {MPS_TAG: summary.mps})
        status = "KILLED" if "interrupted" in summary.statuses.values() else "FINISHED"
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or tracking.is_disk_full(exc):
            status = "KILLED"
        if tracking.is_disk_full(exc) and not isinstance(exc, tracking.DiskFullError):
            raise tracking.DiskFullError(tracking.home()) from None
        raise
    finally:
        try:
            tracking.retry(lambda: tracking.client(uri).set_terminated(parent, status=status))
        except Exception:  # noqa: BLE001 - a full disk may refuse this too; the next run closes stale parents
            if status == "FINISHED":
                raise
    return summary


class _Interrupt:
    """Ctrl-C during `Tuner.fit`: the first one stops every trial where it is (their checkpoints stay for a rerun),
    a second one interrupts at once. Replaces Tune's own handler, whose advice (`Tuner.restore`) does not apply."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _Interrupt:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        log.warning("interrupted: stopping the running trials (Ctrl-C again to stop at once)")

    def __exit__(self, *exc: object) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)

    def stopper(self) -> Any:
        from ray import tune

        interrupt = self

        class Stop(tune.Stopper):
            def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
                return interrupt.requested

            def stop_all(self) -> bool:
                return interrupt.requested

        return Stop()


def _settle(trials: list[dict[str, Any]], errors: dict[str, str], interrupted: bool, summary: RunSummary) -> None:
    """Each trial's outcome, read from its child run (what the trial itself recorded is the truth). A trial that did
    not finish is closed as `interrupted` (KILLED) when the run was stopped, else as `failed` (FAILED) with its
    error, so the store never keeps a RUNNING trial nobody runs."""
    for t in trials:
        key = t["key"]
        run = tracking.retry(lambda t=t: tracking.client(t["tracking_uri"]).get_run(t["run_id"]))
        status = run.data.tags.get(tracking.STATUS_TAG, "")
        if status not in tracking.DONE_STATUSES:
            status = "interrupted" if interrupted or status == "interrupted" else "failed"
            lines = [x for x in errors.get(key, "").splitlines() if x.strip()]
            error = run.data.tags.get("bench.error") or (lines[-1] if lines else "")
            tracking.close_trial(t["tracking_uri"], t["run_id"], status, error)
            if error:
                summary.errors[key] = error
        summary.statuses[key] = status
        if run.data.tags.get(SET_ASIDE_TAG, t["set_aside"]) != t["set_aside"]:
            summary.set_aside[key] = run.data.tags[SET_ASIDE_TAG]


def _tune(todo: list[TrialSpec], existing: dict[str, Any], resources: dict[str, dict[str, float]], exp_id: str,
          parent: str, opts: RunOptions, progress: Any, summary: RunSummary, run_tags: dict[str, str]) -> None:
    """Run the trials on Ray Tune; their outcomes (and the step each resumed trial starts from) go to `summary`.
    `run_tags` go on every trial's run, new or adopted."""
    from ray import tune

    from bench.retries import Retries

    uri = opts.tracking_uri
    trials = []
    for spec in todo:
        key = spec.key()
        set_aside = ""
        if key in existing:
            run_id, set_aside = existing[key].info.run_id, existing[key].data.tags.get(SET_ASIDE_TAG, "")
            tracking.adopt(uri, run_id, parent, run_tags)
        else:
            tags = tracking.environment_tags() | opts.trial_tags.get(key, {}) | run_tags
            run_id = tracking.create_trial_run(uri, exp_id, parent, spec, tags)
        d = trial_dir(key, run_id)
        tracking.private_dir(d)
        step = checkpoint_step(d)
        if step is not None:
            summary.resumed[key] = step
        trials.append({"spec": spec.model_dump(), "run_id": run_id, "tracking_uri": uri, "trial_dir": str(d),
                       "key": key, "set_aside": set_aside, "stall_s": opts.stall_minutes * 60, **resources[key]})

    def placement(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        t = config["trial"]
        if t.get("workers", 1) > 1:  # the Ray Train workers reserve their own resources
            return tune.PlacementGroupFactory([{"CPU": DRIVER_CPUS}])
        bundle = {"CPU": t["cpus"]} | ({"GPU": t["gpus"]} if t["gpus"] else {})
        return tune.PlacementGroupFactory([bundle])

    storage = tracking.home() / "ray_results"
    name = f"{exp_id}-{parent[:8]}"
    if not opts.debug:  # results live in MLflow; Tune's own result files are switched off, so it warns of them
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    callbacks = [c for c in (progress, None if opts.debug else Retries(checkpoint_step)) if c is not None]
    with _Interrupt() as interrupt:
        tuner = tune.Tuner(
            tune.with_resources(_tune_trainable, placement),
            param_space={"trial": tune.grid_search(trials)},
            # a worker process runs trial after trial (same results as a fresh one): no start-up and imports each
            tune_config=tune.TuneConfig(max_concurrent_trials=opts.max_concurrent or None, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), verbose=0, stop=interrupt.stopper(),
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                callbacks=callbacks or None,
            ),
        )
        try:
            grid = tuner.fit()
        except BaseException as exc:  # a second Ctrl-C, or the driver's disk filled up: every trial is resumable
            if isinstance(exc, KeyboardInterrupt) or tracking.is_disk_full(exc):
                with contextlib.suppress(Exception):
                    _settle(trials, {}, True, summary)
            raise
    errors = {r.config["trial"]["key"]: f"{type(r.error).__name__}: {r.error}"[:5000] for r in grid if r.error}
    _settle(trials, errors, interrupt.requested, summary)
    shutil.rmtree(storage / name, ignore_errors=True)


def checkpoint_step(folder: Path) -> int | None:
    """The step of the checkpoint a trial folder holds (None without one)."""
    try:
        return int(json.loads((folder / CHECKPOINT_STEP).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tune_trainable(config: dict[str, Any]) -> None:
    trial = config["trial"]
    if trial.get("workers", 1) > 1:
        _fit_data_parallel(trial)
    else:
        run_trial(trial)


def _fit_data_parallel(trial: dict[str, Any]) -> None:
    """Run one trial on `workers` Ray Train workers from inside its Tune trial (which Tune retries on failure)."""
    from ray import train, tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpus = trial["gpus"]
    per_worker = {"CPU": trial["cpus"]} | ({"GPU": gpus} if gpus else {})
    run_name = f"{trial['key']}-{tune.get_context().get_trial_id()}"
    trainer_storage = str(tracking.home() / "ray_train")
    trainer = TorchTrainer(
        _data_parallel_worker,
        train_loop_config={"trial": trial},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=train.ScalingConfig(num_workers=trial["workers"], use_gpu=bool(gpus),
                                           resources_per_worker=per_worker),
        run_config=train.RunConfig(name=run_name, storage_path=trainer_storage, callbacks=[TuneReportCallback()]),
    )
    try:
        trainer.fit()  # rank 0's final report reaches Tune through the callback
    finally:
        shutil.rmtree(Path(trainer_storage) / run_name, ignore_errors=True)


def _data_parallel_worker(config: dict[str, Any]) -> None:
    from ray import train
    from ray.train.torch import get_device

    trial, device = config["trial"], str(get_device())
    if train.get_context().get_world_rank() == 0:
        result = run_trial(trial, tune_report=False, device=device)
    else:
        result = run_replica(trial, device)
    train.report(result)
