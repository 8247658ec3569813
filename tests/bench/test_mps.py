"""MPS for local runs (bench.mps): when a run uses it, and that a run without it says why and changes nothing.

Starting the daemon needs an NVIDIA GPU; on one H200 it ran the nine LoRA trials of results/mini/mps_check.yaml
through MPS (results/mini/mps_check.json). Here: the decisions, and that `--mps on` is refused where MPS cannot be
used, before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from bench import mps

NO_GPU = not Path("/dev/nvidiactl").exists()


def _unchanged_env() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in mps.ENV}


def test_off_never_starts_it() -> None:
    before = _unchanged_env()
    with mps.for_run("off", local=True) as state:
        assert not state.on and state.describe() == "off (--mps off)"
        assert _unchanged_env() == before


def test_a_cluster_run_leaves_it_to_the_nodes() -> None:
    with mps.for_run("auto", local=False) as state:
        assert not state.on and "its nodes decide" in state.reason


def test_a_server_chosen_already_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/somewhere/else")
    with mps.for_run("auto", local=True) as state:
        assert not state.on and "is set already" in state.reason
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == "/somewhere/else"


def test_hidden_gpus_run_time_sliced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with mps.for_run("auto", local=True) as state:
        assert not state.on and "hides every GPU" in state.reason
    with pytest.raises(mps.MpsUnavailable, match="--mps on, but MPS cannot be used here: CUDA_VISIBLE_DEVICES"):
        with mps.for_run("on", local=True):
            pass


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA GPU")
def test_without_a_gpu_auto_runs_time_sliced_and_on_is_refused() -> None:
    before = _unchanged_env()
    with mps.for_run("auto", local=True) as state:
        assert not state.on and state.reason == "no NVIDIA GPU on this machine"
        assert _unchanged_env() == before
    with pytest.raises(mps.MpsUnavailable, match="no NVIDIA GPU"):
        with mps.for_run("on", local=True):
            pass


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA GPU")
def test_mps_on_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys) -> None:
    from tests.bench.test_cli_errors import run_cli

    code, out, err = run_cli(["run", "--suite", "smoke", "--mps", "on"], tmp_path, monkeypatch, capsys)
    assert code == 2, out + err
    assert "--mps on, but MPS cannot be used here: no NVIDIA GPU on this machine" in " ".join(err.split())
    assert "Traceback" not in out + err
    assert list(tmp_path.iterdir()) == []


def test_the_dry_run_estimates_what_the_mode_would_do() -> None:
    assert mps.expects_mps("auto") and mps.expects_mps("on") and not mps.expects_mps("off")


def test_a_ray_started_before_the_run_is_left_as_it_is() -> None:
    import shutil

    import ray

    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp)
    try:
        with mps.for_run("auto", local=True) as state:
            assert not state.on and "Ray was started in this process" in state.reason
        assert ray.is_initialized()  # the run did not shut down a Ray it did not start
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
