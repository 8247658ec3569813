"""The harness sees tasks only through their contract: bench imports `tasks` (the registry) and `tasks.base`, never
a task's own modules; and the results modules do not import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = sorted((ROOT / "bench").rglob("*.py"))
CONTRACT = {"tasks", "tasks.base"}


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module in ("tasks", "bench")}
    return names


def _contract(name: str) -> bool:
    """`tasks`, `tasks.base`, or a name of the registry module (`from tasks import get_task`), not a task's module."""
    head, _, rest = name.partition(".")
    if name in CONTRACT or head != "tasks":
        return True
    return "." not in rest and not (ROOT / "tasks" / rest).exists() and not (ROOT / "tasks" / f"{rest}.py").exists()


@pytest.mark.parametrize("path", BENCH, ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_imports_tasks_only_through_the_contract(path):
    assert sorted(n for n in imported(path) if not _contract(n)) == []


def test_the_check_sees_a_task_module():
    assert not _contract("tasks.llm_pretrain.throughput") and not _contract("tasks.rl")
    assert _contract("tasks.get_task") and _contract("tasks.base")


def test_results_modules_form_no_cycle():
    deps = {p.stem: {n.split(".")[1] for n in imported(p) if n.startswith("bench.")}
            for p in BENCH if p.stem in ("leaderboard", "analyses", "results")}
    assert "leaderboard" not in deps["analyses"] | deps["results"]
    assert "analyses" not in deps["results"]
