"""Safety rules of the code base: no eval of strings, weights-only checkpoint loading, loopback services."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("make", ["local", "harness"])
def test_checkpoints_with_code_objects_are_refused(tmp_path, make):
    torch.save({"step": 3, "payload": Payload()}, tmp_path / "checkpoint.pt")
    if make == "local":
        ctx = LocalContext(workdir=tmp_path)
    else:
        ctx = HarnessContext("sqlite:///unused.db", "run", tmp_path, seed=0, device="cpu", tune_report=False)
    with pytest.raises(pickle.UnpicklingError):
        ctx.load_checkpoint()
