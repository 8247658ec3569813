"""Sweeps that survive kills and concurrency and lose nothing (real Ray Tune, real MLflow, real training)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.suite import load_trials, unique_specs
from tests.conftest import Bench

pytestmark = pytest.mark.slow

LONG = """\
name: long
experiments:
  - task: llm_pretrain
    preset: smoke
    table: long
    overrides: {steps: 100, checkpoint_every: 10, eval_every: 50, log_every: 5}
    hparams: {lr: 3e-3}
    optimizers: [adamw]
    seeds: SEEDS
"""


def write_suite(b: Bench, seeds: str) -> str:
    path = b.root / "long.yaml"
    path.write_text(LONG.replace("SEEDS", seeds))
    return str(path)


def runs_of(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id]) if exp else []


class TrialFolder:
    """The checkpoint folder of a trial (named after its key and its child run, which the run creates)."""

    def __init__(self, home: Path, key: str) -> None:
        self.home, self.key = home, key

    def __truediv__(self, name: str) -> Path:
        found = sorted((self.home / "trials").glob(f"{self.key}-*"))
        return (found[-1] if found else self.home / "trials" / f"{self.key}-none") / name


def trial_folder(b: Bench, suite: str, seed: int) -> TrialFolder:
    _, trials = load_trials(suite)
    return TrialFolder(b.home, next(s.key() for s in unique_specs(trials) if s.seed == seed))


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def checkpointed(folder: TrialFolder) -> bool:
    return (folder / "checkpoint.pt").exists() and (folder / "worker.pid").exists()


def run_and_signal_worker(b: Bench, sig: signal.Signals) -> tuple[int, str]:
    """`bench run` of one long trial whose worker gets `sig` after its first checkpoint: (the worker's pid, the run's
    output). The run must end with exit code 0."""
    suite = write_suite(b, "[0]")
    folder = trial_folder(b, suite, 0)
    log = b.root / "run.log"  # a file, not a pipe: Ray's helper processes may outlive the driver holding its fds
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--suite", suite], cwd=b.root, env=b.env,
                                stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: checkpointed(folder), 300, "first checkpoint")
        pid = int((folder / "worker.pid").read_text())
        os.kill(pid, sig)
        proc.wait(600)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return pid, log.read_text()


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path):
    clean = Bench(tmp_path / "clean")
    clean.root.mkdir()
    done = clean("run", "--suite", write_suite(clean, "[0]"))
    assert done.returncode == 0, done.stderr[-3000:]
    ref_run = next(r for r in runs_of(clean.uri, "bench-long") if r.data.tags.get("bench.role") == "trial")
    reference = ref_run.data.metrics["final.val_perplexity"]

    b = Bench(tmp_path / "killed")
    b.root.mkdir()
    pid, text = run_and_signal_worker(b, signal.SIGKILL)
    # a kill from outside leaves no fatal error in the worker's log
    assert (f"trial llm_pretrain/smoke adamw(lr=0.003) seed=0: worker died (pid {pid}; no fatal error in its Ray "
            f"log), retrying from step ") in " ".join(text.split()), text[-3000:]
    assert "ActorDiedError" not in text and "Traceback" not in text
    run = next(r for r in runs_of(b.uri, "bench-long") if r.data.tags.get("bench.role") == "trial")
    assert run.data.tags["bench.status"] == "finished"
    assert run.data.tags.get("bench.resumed_from_step") not in (None, "0")  # the retry started from the checkpoint
    assert run.data.metrics["final.val_perplexity"] == pytest.approx(reference, rel=1e-4)
    steps = [m.step for m in MlflowClient(b.uri).get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(5, 101, 5))  # every point once: none lost, none written twice


def test_a_crashed_worker_leaves_its_fatal_error_with_the_trial(tmp_path):
    """A worker that dies of a fatal signal (here SIGSEGV) dumps its Python stacks into its Ray log: the retry line
    names the error and the trial's run keeps the end of that log."""
    b = Bench(tmp_path)
    pid, text = run_and_signal_worker(b, signal.SIGSEGV)
    text = " ".join(text.split())
    assert f"seed=0: worker died (Segmentation fault; pid {pid}), retrying from step " in text, text[-3000:]
    run = next(r for r in runs_of(b.uri, "bench-long") if r.data.tags.get("bench.role") == "trial")
    assert run.data.tags["bench.status"] == "finished"
    kept = Path(MlflowClient(b.uri).download_artifacts(run.info.run_id, f"worker_death_{pid}.txt", str(tmp_path)))
    dump = kept.read_text()
    assert "Fatal Python error: Segmentation fault" in dump and 'File "' in dump, dump  # the stacks, with files


def test_killed_driver_resumes_without_duplicates(tmp_path):
    b = Bench(tmp_path)
    suite = write_suite(b, "[0, 1]")
    second = trial_folder(b, suite, 1)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--suite", suite, "--max-concurrent", "1"],
                            cwd=b.root, env=b.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def first_done_second_started() -> bool:
        finished = [r for r in runs_of(b.uri, "bench-long") if r.data.tags.get("bench.status") == "finished"]
        return len(finished) == 1 and checkpointed(second)

    wait_for(first_done_second_started, 600, "one finished trial and a checkpoint of the other")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    time.sleep(3)
    again = b("run", "--suite", suite, "--max-concurrent", "1")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 trials run, 1 already done" in " ".join(again.stdout.split())
    runs = runs_of(b.uri, "bench-long")
    trials = [r for r in runs if r.data.tags.get("bench.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("bench.role") == "parent"]
    assert len(trials) == 2 and all(r.data.tags["bench.status"] == "finished" for r in trials)
    assert all(r.info.status != "RUNNING" for r in parents)  # the killed driver's parent run is closed
    parent_ids = {r.info.run_id for r in parents}
    assert all(r.data.tags["mlflow.parentRunId"] in parent_ids for r in trials)  # no orphans
    c = MlflowClient(b.uri)
    for r in trials:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
        assert sorted(steps) == list(range(5, 101, 5)), r.data.tags["bench.seed"]


def test_eight_concurrent_trials_lose_no_metric_points(tmp_path, monkeypatch):
    import ray

    from bench import tracking
    from bench.runner import RunOptions, run_specs

    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    uri = tracking.default_tracking_uri()
    (tmp_path / "s.yaml").write_text(LONG.replace("SEEDS", "8").replace(
        "{steps: 100, checkpoint_every: 10, eval_every: 50, log_every: 5}",
        "{steps: 24, checkpoint_every: 6, eval_every: 12, log_every: 1}"))
    _, trials = load_trials(str(tmp_path / "s.yaml"))
    specs = unique_specs(trials)
    assert len(specs) == 8
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        summary = run_specs(specs, {s.key(): {"cpus": 1, "gpus": 0} for s in specs}, "bench-concurrent",
                            RunOptions(tracking_uri=uri), {"bench.suite": "concurrent"})
    finally:
        ray.shutdown()
    assert sorted(summary.statuses.values()) == ["finished"] * 8
    c = MlflowClient(uri)
    for run in tracking.trial_runs(uri, summary.experiment_id).values():
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss")) == list(range(1, 25))
        assert len(c.get_metric_history(run.info.run_id, "val_loss")) == 2


def test_local_ray_listens_on_loopback_only():
    import psutil
    import ray

    from bench.runner import RunOptions, _init_ray

    _init_ray(RunOptions(tracking_uri="sqlite:///unused.db"))
    try:
        ray_pids = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}
        listening = [c for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
    finally:
        ray.shutdown()
    assert listening
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for c in listening), listening
