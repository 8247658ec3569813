"""CUDA MPS for a local run: trials sharing a GPU run their kernels side by side instead of taking turns.

Without it, the processes of the trials that share a GPU are time-sliced: one context's kernels at a time. Small
models run many small kernels, so most of each turn leaves the GPU's SMs idle. Through an MPS server the kernels of
every trial run at once. Measured on one H200 (results/perf/h200_finetune_mps.json, h200_mini_mps.json and
results/mini/mps_check.json): nine fine-tuning trials' training steps went from 303-312 to 510 examples/s, and the
whole trials from 504 to 334 s; ten mini LLaMA processes' CUDA-graph steps from 3.07M to 3.49M tokens/s, and 57
whole mini LLaMA trials from 381 to 311 s (results/mini/mps_llama_check.json).

The daemon is the run's own: `nvidia-cuda-mps-control -d` with pipe and log folders in a new temporary folder, which
only this run's processes (the local Ray instance and its workers, through the environment) are pointed at. It is
checked with a CUDA context made through it before any trial starts, and stopped through its own pipe when the run
ends, after the local Ray instance is shut down. Nothing else on the machine uses it and the GPU's settings are left
as they are. `auto` uses MPS for a local run on a machine with an NVIDIA GPU where the daemon starts and a context
can be made through it, and runs time-sliced otherwise (saying why); `on` refuses to run without it; `off` never
starts it. A run on a Ray cluster (`--address`) leaves MPS to the cluster's nodes. A run killed outright (SIGKILL)
cannot stop its daemon: `echo quit | CUDA_MPS_PIPE_DIRECTORY=FOLDER/pipe nvidia-cuda-mps-control` does, FOLDER being
its `bench-mps-*` folder in the temporary directory (named in the `--debug` log).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]
MODES: tuple[Mode, ...] = ("auto", "on", "off")
DEFAULT_MODE: Mode = "auto"
CONTROL = "nvidia-cuda-mps-control"
ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
CHECK_TIMEOUT_S = 180.0  # a first CUDA context (torch import included) through a fresh server
QUIT_TIMEOUT_S = 60.0
# A context made through the daemon, in a fresh process as a trial's would be.
_CHECK = "import torch; assert torch.cuda.is_available(), 'no CUDA device'; torch.ones(1, device='cuda').sum().item()"


class MpsUnavailable(RuntimeError):
    """`--mps on` was asked for and MPS cannot be used here (raised before any trial starts)."""


@dataclass(frozen=True)
class MpsState:
    """Whether the run's trials share their GPUs through MPS, and why not when they do not."""

    on: bool
    reason: str = ""

    def describe(self) -> str:
        return "on" if self.on else f"off ({self.reason})"


def expects_mps(mode: Mode) -> bool:
    """Whether a local run on a GPU machine would use MPS with `mode` (what `--dry-run` estimates for)."""
    return mode != "off"


def unavailable_reason(local: bool) -> str:
    """Why MPS cannot be used for this run ("" when it can be tried)."""
    if not local:
        return "a Ray cluster (--address): its nodes decide"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return "Ray was started in this process before the run: its workers cannot be pointed at an MPS server"
    if os.environ.get(ENV[0]):
        return f"{ENV[0]} is set already: the processes of this run use that MPS server"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    if not Path("/dev/nvidiactl").exists():
        return "no NVIDIA GPU on this machine"
    if shutil.which(CONTROL) is None:
        return f"{CONTROL} is not on PATH"
    return ""


def refuse_unavailable(mode: Mode, local: bool) -> None:
    """Raise `MpsUnavailable` when `--mps on` is asked for where MPS cannot even be tried (checks nothing else)."""
    if mode == "on" and (reason := unavailable_reason(local)):
        raise MpsUnavailable(_refusal(reason))


def _refusal(reason: str) -> str:
    return f"--mps on, but MPS cannot be used here: {reason}. Run with --mps auto or off."


def _control(command: str | None, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    args = [CONTROL] + ([] if command is not None else ["-d"])
    return subprocess.run(args, input=command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@contextmanager
def for_run(mode: Mode, local: bool) -> Iterator[MpsState]:
    """MPS for the trials of one run (see the module docstring); yields what was decided."""
    if mode == "off":
        yield MpsState(False, "--mps off")
        return
    reason = unavailable_reason(local)
    folder = None if reason else Path(tempfile.mkdtemp(prefix="bench-mps-"))
    env = dict(os.environ)
    if folder is not None:
        env.update({ENV[0]: str(folder / "pipe"), ENV[1]: str(folder / "log")})
        for name in ENV:
            Path(env[name]).mkdir()
        reason = _start(env)
    if reason:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if mode == "on":
            raise MpsUnavailable(_refusal(reason))
        log.info("MPS off: %s; trials sharing a GPU are time-sliced", reason)
        yield MpsState(False, reason)
        return
    assert folder is not None
    before = {name: os.environ.get(name) for name in ENV}
    os.environ.update({name: env[name] for name in ENV})
    log.info("MPS on: the trials sharing a GPU run through this run's MPS server (folder %s)", folder)
    try:
        yield MpsState(True)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _stop(env, folder)


def _start(env: dict[str, str]) -> str:
    """Start the daemon and make a context through it; "" when that worked, else why not (the daemon stopped)."""
    try:
        started = _control(None, env, QUIT_TIMEOUT_S)
        if started.returncode != 0:
            return f"{CONTROL} -d failed: {(started.stderr or started.stdout).strip()[:300]}"
        check = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True,
                               timeout=CHECK_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _control("quit", env, QUIT_TIMEOUT_S)
        return f"{CONTROL} did not answer: {exc}"
    if check.returncode != 0:
        _control("quit", env, QUIT_TIMEOUT_S)
        lines = [x for x in check.stderr.splitlines() if x.strip()]
        return f"no CUDA context could be made through it ({lines[-1][:300] if lines else check.returncode})"
    return ""


def _stop(env: dict[str, str], folder: Path) -> None:
    """Shut the local Ray instance down (its idle workers hold contexts on the server), then quit the daemon."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        done = _control("quit", env, QUIT_TIMEOUT_S)
        if done.returncode != 0:
            log.warning("stopping the MPS daemon of %s failed: %s", folder, (done.stderr or done.stdout).strip())
    except subprocess.TimeoutExpired:
        log.warning("the MPS daemon of %s did not stop within %.0f s", folder, QUIT_TIMEOUT_S)
    shutil.rmtree(folder, ignore_errors=True)
