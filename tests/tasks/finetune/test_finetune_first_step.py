"""A compiled trial's first step: one process compiles while those that start with it wait, then they step together."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from tasks.finetune.first_step import first_step, marks_dir
from tasks.finetune.start_scores import key_of
from tests.tasks.finetune.processes import start_together

# A trial process in miniature: says it is ready, waits for the others, then takes a one-second "first step".
CHILD = """
import json, os, sys, time
from pathlib import Path
from tasks.finetune.first_step import first_step

work = Path(sys.argv[1])
(work / f"ready.{os.getpid()}").touch()
while not (work / "go").exists():
    time.sleep(0.01)
with first_step({"graph": "shared"}) as how:
    start = time.time()
    time.sleep(1.0)
print(json.dumps({"how": how.how, "waited": how.waited_s, "start": start, "end": time.time()}))
"""


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh inductor cache folder per test (these compile nothing): the user's is neither read nor written."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return tmp_path / "inductor"


def test_one_compiles_alone_and_the_others_step_together_after_it(tmp_path: Path) -> None:
    steps = start_together(CHILD, tmp_path, 3)
    first = [s for s in steps if s["how"] == "first"]
    after = [s for s in steps if s["how"] == "after another"]
    assert len(first) == 1 and len(after) == 2, steps
    assert all(s["start"] >= first[0]["end"] - 0.01 and s["waited"] > 0.5 for s in after)  # waited for it
    assert after[0]["start"] < after[1]["end"] and after[1]["start"] < after[0]["end"]  # then stepped together
    assert (marks_dir() / f"{key_of({'graph': 'shared'})}.done").exists()
    with first_step({"graph": "shared"}) as later:  # once compiled, a trial does not wait at all
        assert later.how == "warm" and later.waited_s == 0.0


def test_a_first_step_that_fails_leaves_no_mark() -> None:
    with pytest.raises(RuntimeError), first_step({"graph": "g"}) as how:
        assert how.how == "first"
        raise RuntimeError("diverged while compiling")
    with first_step({"graph": "g"}) as again:
        assert again.how == "first"  # the next trial compiles, holding the lock
    with first_step({"graph": "g"}) as later:
        assert later.how == "warm"


def test_a_lock_held_too_long_is_not_waited_for() -> None:
    folder = marks_dir()
    folder.mkdir(parents=True)
    with open(folder / f"{key_of({'graph': 'hung'})}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a trial whose first step hangs
        with first_step({"graph": "hung"}, wait_s=0.3) as how:
            assert how.how == "not waited" and how.waited_s >= 0.3
    assert not (folder / f"{key_of({'graph': 'hung'})}.done").exists()
