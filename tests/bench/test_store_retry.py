"""Store calls retry the store's transient errors and nothing else."""

from __future__ import annotations

import pytest

from bench import tracking


def _failing(messages: list[str]):
    """A store call that raises `messages` in turn, then returns how many calls it took."""
    calls = []

    def call() -> int:
        calls.append(1)
        if len(calls) <= len(messages):
            raise RuntimeError(messages[len(calls) - 1])
        return len(calls)

    return call


@pytest.mark.parametrize("message", [
    "(sqlite3.OperationalError) database is locked",
    "MlflowException: (builtins.AttributeError) 'SQLiteCompiler' object has no attribute 'literal_execute_params'",
])
def test_transient_errors_are_retried(monkeypatch, message):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    assert tracking.retry(_failing([message, message])) == 3


def test_other_errors_are_raised_at_once(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    call = _failing(["UNIQUE constraint failed: tags.key"])
    with pytest.raises(RuntimeError, match="UNIQUE constraint"):
        tracking.retry(call)


def test_a_lasting_transient_error_is_raised_after_the_attempts(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match="locked"):
        tracking.retry(_failing(["database is locked"] * 10), attempts=4)
