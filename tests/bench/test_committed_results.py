"""The committed large-corpus tables are what `bench leaderboard` makes of the committed store of that run."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest

from bench import leaderboard
from bench.cli import experiment_name
from bench.suite import load_trials

LARGE_CORPUS = Path(__file__).parents[2] / "results" / "mini" / "large_corpus"
TABLES = {"llm_pretrain_bf16", "llm_pretrain_4bit", "qat_spam", "finetune_commonsense"}


@pytest.mark.usefixtures("large_corpus_keys")  # the run's keys
def test_committed_large_corpus_tables_match_their_store(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    with lzma.open(LARGE_CORPUS / "suite_store.db.xz") as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    _, trials = load_trials("mini", only=TABLES)
    leaderboard.write(trials, f"sqlite:///{db}", experiment_name("mini"), tmp_path / "out")
    for table in sorted(TABLES):
        made = (tmp_path / "out" / f"{table}.csv").read_text()
        assert "pending" not in made, table
        assert made == (LARGE_CORPUS / f"{table}.csv").read_text(), table
