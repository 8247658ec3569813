"""End to end with real Ray Tune and a real MLflow store: the smoke suite, resuming, divergence, the UI, a cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from bench.suite import load_trials, unique_specs
from tests.bench.ray_cluster import RayCluster
from tests.conftest import Bench

pytestmark = pytest.mark.slow


def trial_runs(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string="tags.`bench.role` = 'trial'")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Bench, subprocess.CompletedProcess]:
    b = Bench(tmp_path_factory.mktemp("smoke"))
    return b, b("run", "--suite", "smoke")


def test_smoke_suite_end_to_end(smoke):
    b, result = smoke
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = trial_runs(b.uri, "bench-smoke")
    metric = {"llm_pretrain": "val_perplexity", "rl": "test_return", "forecasting": "test_mse", "finetune": "acc"}
    assert {r.data.tags["bench.task"] for r in runs} == set(metric)
    c = MlflowClient(b.uri)
    for r in runs:
        assert r.data.tags["bench.status"] == "finished"
        assert r.data.tags["mlflow.parentRunId"]
        assert r.data.tags["bench.git_commit"] and r.data.tags["bench.version.torch"] and r.data.tags["bench.device"]
        assert r.data.params["optimizer"] == r.data.tags["bench.optimizer"]
        assert any(k.startswith(("opt.", "optimizer.")) for k in r.data.params)  # resolved hparams at step 0
        assert f"final.{metric[r.data.tags['bench.task']]}" in r.data.metrics
        # where the trial's wall time went: the worker's start before the task, and the task
        assert r.data.metrics["time.worker_start_s"] >= 0 and r.data.metrics["time.task_s"] > 0
        # and the memory the host had: the worker's peak (a Python with torch holds well over 100 MiB), what is left
        assert 0.1 < r.data.metrics["mem.worker_peak_rss_gib"] < 24 and r.data.metrics["mem.host_available_gib"] > 0
    for task, curve in (("rl", "test_return"), ("forecasting", "test_mse"), ("finetune", "acc")):
        for r in (r for r in runs if r.data.tags["bench.task"] == task):
            assert len(c.get_metric_history(r.info.run_id, curve)) >= 2, (task, curve)  # a curve, not one number
    llm = [r for r in runs if r.data.tags["bench.task"] == "llm_pretrain"]
    assert {"adamw", "spam", "stable_spam"} <= {r.data.tags["bench.optimizer"] for r in llm}
    for r in llm:
        assert r.data.metrics["final.val_perplexity"] > 1
        phases = [r.data.metrics[f"time.{p}_s"] for p in ("setup", "first_step", "eval", "checkpoint")]
        assert all(v >= 0 for v in phases) and sum(phases) < r.data.metrics["time.task_s"]
        loss = c.get_metric_history(r.info.run_id, "loss")
        assert len(loss) >= 3 and loss[-1].value < loss[0].value
    parent = c.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    # how the trials shared the GPU is recorded on the parent and every trial (CPU trials here: no MPS, and why)
    assert parent.data.tags["bench.mps"].startswith("off (") and {r.data.tags["bench.mps"] for r in runs} == {
        parent.data.tags["bench.mps"]}
    assert any(a.path == "leaderboard" for a in c.list_artifacts(parent.info.run_id))
    board = (b.root / "results" / "smoke" / "llm_pretrain_bf16.md").read_text()
    for row in ("adam", "spam", "stable_spam"):
        assert f"| {row} |" in board
    assert (b.root / "results" / "smoke" / "llm_pretrain_bf16_curves.png").stat().st_size > 1000
    assert "llm_pretrain_bf16" in result.stdout  # the leaderboard is printed at the end


def test_second_run_starts_no_trial(smoke):
    b, _ = smoke
    before = {r.info.run_id for r in trial_runs(b.uri, "bench-smoke")}
    again = b("run", "--suite", "smoke")
    assert again.returncode == 0, again.stderr[-3000:]
    total = len(unique_specs(load_trials("smoke")[1]))
    assert f"0 trials run, {total} already done" in " ".join(again.stdout.split())
    assert {r.info.run_id for r in trial_runs(b.uri, "bench-smoke")} == before
    board = b("leaderboard", "--suite", "smoke", "--format", "csv")
    assert board.returncode == 0 and board.stdout.startswith("experiment,table,")


def test_ui_shows_trial_runs(smoke, tmp_path):
    b, _ = smoke
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (setup.sh --dev installs it)")
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "bench", "ui", "--port", str(port)], cwd=b.root, env=b.env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1600,1000"]
    runs = [r for r in trial_runs(b.uri, "bench-smoke") if r.data.tags["bench.task"] == "llm_pretrain"]
    exp = runs[0].info.experiment_id
    base = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs"
    shot = Path(os.environ.get("BENCH_TEST_ARTIFACTS", tmp_path)) / "mlflow_ui_trial_run.png"
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90)
        bound = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert bound == {"127.0.0.1"}, bound  # loopback unless told otherwise
        experiment_page = dump_dom(chromium, flags, base)
        trial_pages = {r.info.run_name: dump_dom(chromium, flags, f"{base}/{r.info.run_id}") for r in runs}
        subprocess.run([chromium, *flags, f"--screenshot={shot}", f"{base}/{runs[0].info.run_id}"],
                       capture_output=True, timeout=120)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # the server and its workers
        ui.wait(30)
    # a first visit lands on the leaderboard view: the trial runs grouped by table, with the headline metric
    assert "bench-smoke" in experiment_page and "matching runs" in experiment_page
    assert "bench.table" in experiment_page and "final.val_perplexity" in experiment_page
    assert all(r.info.run_name in experiment_page for r in runs), [r.info.run_name for r in runs]
    for name, page in trial_pages.items():
        assert name in page and "val_perplexity" in page and "bench.status" in page
    assert shot.exists() and shot.stat().st_size > 10_000


def dump_dom(chromium: str, flags: list[str], url: str) -> str:
    return subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


DIVERGE = """\
name: diverge
experiments:
  - task: llm_pretrain
    preset: smoke
    table: divergence
    overrides: {steps: 12, inject_nan_at: [6, null]}
    hparams: {lr: 1e-3}
    optimizers: [adamw]
"""


def test_divergence_is_recorded_and_suite_completes(bench):
    (bench.root / "diverge.yaml").write_text(DIVERGE)
    result = bench("run", "--suite", str(bench.root / "diverge.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = trial_runs(bench.uri, "bench-diverge")
    status = {r.data.params["task.inject_nan_at"]: r for r in runs}
    assert status["6"].data.tags["bench.status"] == "diverged"
    assert "non-finite" in status["6"].data.tags["bench.diverged_reason"]
    assert status["6"].data.metrics["diverged"] == 1.0
    assert status["None"].data.tags["bench.status"] == "finished"
    board = (bench.root / "results" / "diverge" / "divergence.md").read_text()
    assert "diverged" in board
    again = bench("run", "--suite", str(bench.root / "diverge.yaml"))
    assert "0 trials run, 2 already done" in " ".join(again.stdout.split())  # a diverged trial is not re-run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_cluster_mode(bench):
    """A head and a worker node started with `ray start` on 127.0.0.1 with token authentication on and the token in
    RAY_AUTH_TOKEN (as on machines that share no home folder); `bench run --address` against them."""
    cluster = RayCluster(bench.root, bench.env, free_port())
    cluster.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # nodes and driver share it
    bench.env = cluster.env
    server_port = free_port()
    server = None
    try:
        cluster.start_head("--num-cpus=1", "--include-dashboard=false")
        cluster.start_worker("--num-cpus=1")
        (bench.root / "one.yaml").write_text(DIVERGE.replace("inject_nan_at: [6, null]", "inject_nan_at: null")
                                             .replace("name: diverge", "name: cluster"))
        refused = bench("run", "--suite", str(bench.root / "one.yaml"), "--address", cluster.address)
        assert refused.returncode == 2 and "tracking server" in refused.stderr, refused.stderr
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(server_port),
             "--backend-store-uri", f"sqlite:///{bench.root / 'server.db'}", "--workers", "1"],
            env={**cluster.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        uri = f"http://127.0.0.1:{server_port}"
        wait_http(uri + "/health", 90)
        ok = bench("run", "--suite", str(bench.root / "one.yaml"), "--address", cluster.address,
                   "--tracking-uri", uri)
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        runs = trial_runs(uri, "bench-cluster")
        assert len(runs) == 1 and runs[0].data.tags["bench.status"] == "finished"
    finally:
        if server:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        cluster.stop()
    assert not cluster.processes()


def test_sweep_grid_then_best_lr_over_seeds(bench):
    result = bench("sweep", "--task", "llm_pretrain", "--optimizer", "adamw,spam", "--lr", "1e-3,1e-2",
                   "--seeds", "2", "--set", "task.steps=12", "--set", "task.eval_every=6",
                   "--set", "hparams.reset_interval=6")
    assert result.returncode == 2 and "no hyperparameter 'reset_interval'" in result.stderr  # adamw has none
    result = bench("sweep", "--task", "llm_pretrain", "--optimizer", "adamw,spam", "--lr", "1e-3,1e-2",
                   "--seeds", "2", "--set", "task.steps=12", "--set", "task.eval_every=6")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "best learning rates: adamw=" in " ".join(result.stdout.split())
    (out,) = (bench.root / "results").glob("sweep-llm_pretrain-smoke-*")  # named with a hash of what it sweeps
    runs = trial_runs(bench.uri, f"bench-{out.name}")
    assert len(runs) == 4 + 2  # the grid, then seed 1 of each best lr (seed 0 is the grid's own trial)
    for opt in ("adamw", "spam"):
        best = [r for r in runs if r.data.tags["bench.optimizer"] == opt and r.data.tags["bench.seed"] == "1"]
        assert len(best) == 1
    assert (out / f"{out.name}-grid_lr_sweep.png").exists()
    assert "±" in (out / f"{out.name}-best.md").read_text()  # mean ± spread over the 2 seeds
    again = bench("leaderboard", "--suite", out.name)  # a sweep's results can be printed again by its name
    assert again.returncode == 0 and f"{out.name}-best" in again.stdout, again.stderr
