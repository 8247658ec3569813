"""A new local Ray instance keeps its session (logs, sockets) under BENCH_HOME when that path leaves room for Ray's
Unix sockets, else in Ray's default folder; `--debug` says where the logs are."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest

from bench.runner import RunOptions, _init_ray, ray_temp_dir


def test_a_bench_home_too_long_for_rays_sockets_keeps_rays_default(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / ("x" * 60)))
    assert ray_temp_dir() is None
    monkeypatch.setenv("BENCH_HOME", "/tmp/b")
    assert ray_temp_dir() == Path("/tmp/b/ray").resolve()


@pytest.mark.slow
def test_local_ray_logs_go_under_bench_home(monkeypatch, caplog):
    import ray

    # pytest's own tmp_path is too long a path for Ray's sockets, so a short folder in /tmp
    with tempfile.TemporaryDirectory(dir="/tmp", ignore_cleanup_errors=True) as short:
        home = Path(short).resolve() / ".bench"
        monkeypatch.setenv("BENCH_HOME", str(home))
        caplog.set_level(logging.INFO, logger="bench.runner")
        _init_ray(RunOptions(tracking_uri="sqlite:///unused.db", debug=True))
        try:
            temp = Path(ray.get_runtime_context().get_temp_dir())
        finally:
            ray.shutdown()
        (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ray's logs: ")]
        logs = Path(said.removeprefix("Ray's logs: "))
        assert temp == home / "ray"
        assert logs.is_relative_to(home / "ray") and logs.name == "logs" and any(logs.iterdir())
