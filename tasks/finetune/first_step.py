"""A compiled trial's first training step, taken by one process of the machine at a time until one has taken it.

The first step of a trial with compiled decoder layers (`compile: true`) compiles their forward and backward graphs
(inductor's generated code and its Triton kernels), which torch.compile keeps in its on-disk caches; a later process
builds the same graphs from them. Trials that start together would otherwise all compile the same graphs at once on
the machine's cores: on an H200 with 16 cores, the fourteen LoRA trials of the `mini` table's first wave took about
160 s for their first ten steps, while the table's full fine-tuning trials, starting when most kernels were compiled,
took about 14 s, and the one LoRA trial of a later wave 18 s (results/mini/finetune_tf32.json). What this module
saves a table on the GPU is not measured yet.

So the first trial of a graph takes an exclusive `flock` on `<key>.lock` for its first step and leaves `<key>.done`
after it, in `bench_first_step/` of inductor's cache folder (`TORCHINDUCTOR_CACHE_DIR`, by default under the
temporary folder), so that the mark goes when the compiled code it vouches for does. The others wait for the lock,
find the mark, let the lock go and take their first step together, from the caches; one that finds the mark does not
wait at all. The key is a hash of what decides the compiled graphs (`graph_identity`). A trial waits at most `WAIT_S`
(a first step that takes longer, or hangs, does not hold up the others beyond it) and then compiles anyway; the lock
goes with its holder's process, and a step that fails leaves no mark.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

from tasks.finetune.config import MODEL_FIELDS, FinetuneConfig
from tasks.finetune.start_scores import key_of

log = logging.getLogger(__name__)

VERSION = 1  # of the compiled code's identity: raise it when compile_layers changes what it compiles
# the config fields that decide the compiled graphs: the model's (sizes are dynamic: the batch and lengths do not)
KEY_FIELDS = MODEL_FIELDS
WAIT_S = 600.0  # alone, a mini LoRA trial compiled in ~50 s on an H200 (results/perf/h200_finetune_compile.json)
POLL_S = 0.5
How = Literal["first", "after another", "warm", "not waited"]


@dataclass(frozen=True)
class FirstStep:
    """How a trial's first compiled step went: `how` is "first" (it compiled, holding the lock), "after another"
    (it waited while another compiled), "warm" (another had, before it asked) or "not waited" (it gave up waiting
    after `WAIT_S`); `waited_s` is the time it waited for the lock."""

    how: How
    waited_s: float


def graph_identity(cfg: FinetuneConfig, device: torch.device) -> dict[str, Any]:
    """What decides the graphs a compiled trial's first step compiles."""
    return {
        "version": VERSION,
        "config": cfg.model_dump(mode="json", include=set(KEY_FIELDS)),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
    }


def marks_dir() -> Path:
    """Where the locks and marks are: beside the compiled code in inductor's cache folder."""
    return Path(inductor_cache_dir()) / "bench_first_step"


def _lock(lock: Any, wait_s: float) -> bool:
    """Take an exclusive flock on the open file `lock` within `wait_s` seconds; whether it was taken."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)


@contextmanager
def first_step(inputs: dict[str, Any], wait_s: float = WAIT_S) -> Iterator[FirstStep]:
    """Around a trial's first compiled step: alone while it compiles graphs no process of this machine has, else
    without waiting or after the one that compiles them (see the module's docstring)."""
    key = key_of(inputs)
    folder = marks_dir()
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / f"{key}.done"
    if done.exists():
        yield FirstStep("warm", 0.0)
        return
    started = time.monotonic()
    with open(folder / f"{key}.lock", "a") as lock:  # closing the file lets the lock go
        taken = _lock(lock, wait_s)
        waited = time.monotonic() - started
        how: How
        if not taken:
            log.warning("compiled first step: another trial has held %s for %.0f s; compiling without waiting more",
                        lock.name, waited)
            how = "not waited"
        else:
            how = "after another" if done.exists() else "first"
        if how != "first":
            lock.close()  # the others take their first step together
        yield FirstStep(how, waited)
        if how == "first":
            done.touch()
