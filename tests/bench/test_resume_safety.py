"""Resuming never loses or duplicates points: bad checkpoints are set aside, the store is the truth, a full disk is
named and leaves no temp files (real MLflow store, real files)."""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

import pytest
import torch

from bench import tracking
from bench.context import HarnessContext


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    run_id = tracking.client(uri).create_run(tracking.experiment_id(uri, "resume")).info.run_id
    return uri, run_id


def train(uri: str, run_id: str, folder: Path, steps: int, checkpoint_every: int = 5) -> None:
    """A stand-in task: resume from the checkpoint, report a loss per step, checkpoint every few steps."""
    ctx = HarnessContext(uri, run_id, folder, seed=0, device="cpu", tune_report=False)
    state = ctx.load_checkpoint() or {"step": 0}
    for step in range(state["step"] + 1, steps + 1):
        ctx.report(step, loss=1.0 / step)
        if step % checkpoint_every == 0:
            ctx.save_checkpoint({"step": step, "w": torch.ones(3) * step})
    ctx.flush()


def loss_steps(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in tracking.client(uri).get_metric_history(run_id, "loss"))


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "broken written-steps record"])
def test_a_damaged_checkpoint_is_set_aside_and_the_trial_restarts(tmp_path, store, damage, caplog):
    uri, run_id = store
    folder = tmp_path / "trial"
    train(uri, run_id, folder, steps=12)
    ckpt = folder / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    elif damage == "random bytes":
        ckpt.write_bytes(bytes(range(256)) * 8)
    else:
        (folder / "written_steps.json").write_text('{"loss": ')
    with caplog.at_level(logging.WARNING, logger="bench.context"):
        train(uri, run_id, folder, steps=20)
    assert loss_steps(uri, run_id) == list(range(1, 21))  # every point once: none lost, none duplicated
    if damage != "broken written-steps record":
        warning = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
        assert len(warning) == 1 and "checkpoint.pt.unreadable-" in warning[0], warning
        assert len(warning[0].splitlines()) == 1
        tags = tracking.client(uri).get_run(run_id).data.tags  # what the driver reports after the run
        assert "checkpoint.pt.unreadable-" in tags["bench.set_aside"]


def test_a_store_missing_recorded_points_restarts_the_trial(tmp_path, store):
    uri, run_id = store
    folder = tmp_path / "trial"
    train(uri, run_id, folder, steps=12)
    # the store was replaced (deleted mid-run): a new run in a new store, but the same folder and records
    new_uri = f"sqlite:///{tmp_path / 'new.db'}"
    tracking.prepare_store(new_uri)
    new_run = tracking.client(new_uri).create_run(tracking.experiment_id(new_uri, "resume")).info.run_id
    train(new_uri, new_run, folder, steps=20)
    assert loss_steps(new_uri, new_run) == list(range(1, 21))  # not resumed past points the store lacks


class FullDisk:
    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_filesystem_and_leaves_no_temp_file(tmp_path, store):
    uri, run_id = store
    ctx = HarnessContext(uri, run_id, tmp_path / "trial", seed=0, device="cpu", tune_report=False)
    ctx.report(1, loss=1.0)
    with pytest.raises(tracking.DiskFullError, match="no space left on the filesystem mounted at /"):
        ctx.save_checkpoint({"step": 1, "blob": FullDisk()})
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == ["artifacts", "worker.pid", "written_steps.json"]


def test_a_half_created_store_is_created_again(tmp_path):
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)  # what a store creation cut short by a full disk leaves behind
    con.execute("create table secrets (id integer)")
    con.execute("create table experiments (experiment_id integer)")
    con.commit()
    con.close()
    uri = f"sqlite:///{db}"
    tracking.prepare_store(uri)
    assert tracking.experiment_id(uri, "after") is not None
    assert len(list(tmp_path.glob("mlflow.db.incomplete-*"))) == 1  # kept, not deleted
