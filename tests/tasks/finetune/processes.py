"""Test processes started together: trials in miniature that contend for what the fine-tuning task shares."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]


def start_together(child: str, work: Path, processes: int) -> list[Any]:
    """Run `processes` copies of the Python source `child` (argument: `work`) from the repository root, released
    together once each has touched `work/ready.<pid>` (they then wait for `work/go`); each one's last stdout line,
    read as JSON, in the order they were started."""
    children = [subprocess.Popen([sys.executable, "-c", child, str(work)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
                for _ in range(processes)]
    deadline = time.monotonic() + 120
    while len(list(work.glob("ready.*"))) < processes and time.monotonic() < deadline:
        time.sleep(0.05)
    (work / "go").touch()
    outputs = [json.loads(c.communicate(timeout=120)[0].strip().splitlines()[-1]) for c in children]
    assert all(c.returncode == 0 for c in children)
    return outputs
