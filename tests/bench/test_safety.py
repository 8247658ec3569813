"""Safety rules of the code base: no eval of strings, weights-only checkpoint loading, loopback services."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from bench import tracking
from bench.context import HarnessContext
from tasks.base import LocalContext

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for pkg in ("bench", "tasks", "optimizers") for p in (ROOT / pkg).rglob("*.py"))


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node


def test_sources_found():
    assert len(SOURCES) > 30


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_eval_or_exec_of_strings(path):
    bad = [n.lineno for n in calls(path) if isinstance(n.func, ast.Name) and n.func.id in ("eval", "exec")]
    assert not bad, f"{path}: eval/exec at lines {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_torch_load_is_weights_only(path):
    for n in calls(path):
        if isinstance(n.func, ast.Attribute) and n.func.attr == "load" and getattr(n.func.value, "id", "") == "torch":
            kw = {k.arg: k.value for k in n.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, (
                f"{path}:{n.lineno}: torch.load without weights_only=True")


class Payload:
    """Stands for arbitrary code a malicious checkpoint could carry."""


def test_checkpoints_with_code_objects_are_refused(tmp_path):
    torch.save({"step": 3, "payload": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):
        LocalContext(workdir=tmp_path).load_checkpoint()


def test_harness_sets_checkpoints_with_code_objects_aside(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    run_id = tracking.client(uri).create_run(tracking.experiment_id(uri, "safety")).info.run_id
    (tmp_path / "trial").mkdir()
    torch.save({"step": 3, "payload": Payload()}, tmp_path / "trial" / "checkpoint.pt")
    ctx = HarnessContext(uri, run_id, tmp_path / "trial", seed=0, device="cpu", tune_report=False)
    assert ctx.load_checkpoint() is None  # not unpickled: set aside, and the trial starts afresh
    assert [p.name.split("-")[0] for p in (tmp_path / "trial").glob("checkpoint.pt.*")] == ["checkpoint.pt.unreadable"]


def test_store_and_trial_files_are_the_users_only(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    uri = tracking.default_tracking_uri()
    tracking.check_store(uri)
    run_id = tracking.client(uri).create_run(tracking.experiment_id(uri, "safety")).info.run_id
    trial = tmp_path / "home" / "trials" / "k"
    ctx = HarnessContext(uri, run_id, trial, seed=0, device="cpu", tune_report=False)
    ctx.report(1, loss=1.0)
    ctx.save_checkpoint({"step": 1})
    for path in (tmp_path / "home", tmp_path / "home" / "trials", trial):
        assert path.stat().st_mode & 0o777 == 0o700, path
    for path in (tmp_path / "home" / "mlflow.db", trial / "checkpoint.pt", trial / "written_steps.json"):
        assert path.stat().st_mode & 0o777 == 0o600, path
