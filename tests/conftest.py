"""Shared test helpers: run the `bench` command in a scratch folder with its own store and offline settings."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a local Ray binds 127.0.0.1 only
os.environ.update(OFFLINE)
# Without a GPU, the fused-kernel tests run Triton's CPU interpreter. Triton reads this when it is first imported,
# which a test module importing transformers or torch._dynamo may do long before the fused tests run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests run on the default offline corpus, as CI does, whatever this machine has built: the large corpus
# (`setup.sh --corpus large`) would change every LLaMA trial's data and key, and take minutes to tokenize. The folder
# is never created; a test that builds a corpus points BENCH_CORPUS_DIR at its own, and the tests of the built corpus
# back at this machine's own (`built_corpus`).
MACHINE_CORPUS_DIR = os.environ.get("BENCH_CORPUS_DIR")
os.environ["BENCH_CORPUS_DIR"] = str(Path(tempfile.gettempdir()) / f"bench-tests-{os.getpid()}-no-large-corpus")


class Bench:
    """Runs `python -m bench ...` with BENCH_HOME and the working folder inside one scratch folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / ".bench"
        self.env = {**os.environ, **OFFLINE, "BENCH_HOME": str(self.home), "BENCH_CACHE": str(cache_dir())}
        self.env.pop("MLFLOW_TRACKING_URI", None)

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bench", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


def cache_dir() -> Path:
    """Tokenizers and prepared text are cached across tests (and across runs) in one place."""
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "bench"))


@pytest.fixture
def built_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The large corpus this machine has built, if any (its default place unless BENCH_CORPUS_DIR named another)."""
    if MACHINE_CORPUS_DIR is None:
        monkeypatch.delenv("BENCH_CORPUS_DIR")
    else:
        monkeypatch.setenv("BENCH_CORPUS_DIR", MACHINE_CORPUS_DIR)


@pytest.fixture
def large_corpus_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA trial keys as on a machine with the large corpus built: a key names its corpus's sources, so
    BENCH_CORPUS_DIR points at an empty file for each of them (enough for the keys, not for training)."""
    from tasks.llm_pretrain.corpora import SOURCE_NAMES

    corpus = tmp_path / "built-corpus"
    corpus.mkdir()
    monkeypatch.setenv("BENCH_CORPUS_DIR", str(corpus))
    for name in SOURCE_NAMES:
        (corpus / f"{name}.jsonl.gz").touch()


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    return Bench(tmp_path)
