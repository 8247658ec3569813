"""The MLflow UI as `bench ui` opens it, driven in headless Chromium: the model-training pages, also for an experiment
opened from the experiments list, trial runs named by table, label, lr and seed, the leaderboard view (grouped by table
and label, sorted by the headline metric) and the leaderboard tables of the parent run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from bench import leaderboard, tracking
from bench.cli import experiment_name
from tests.bench.test_end_to_end import dump_dom, free_port, wait_http
from tests.bench.test_reports import fill_store

pytestmark = pytest.mark.slow


def test_ui_shows_the_leaderboard(tmp_path, monkeypatch):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (setup.sh --dev installs it)")
    uri, trials = fill_store(tmp_path, monkeypatch)
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment_name("rep"))
    (parent,) = c.search_runs([exp.experiment_id], "tags.`bench.role` = 'parent'")
    leaderboard.write(trials, uri, exp.name, tmp_path / "results" / "rep", parent_run_id=parent.info.run_id)
    tracking.set_leaderboard_view(uri, exp.experiment_id, ["val_perplexity"], lower_is_better=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "bench", "ui", "--port", str(port)], cwd=tmp_path,
                          env={**os.environ, "BENCH_HOME": str(tmp_path / ".bench")}, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1600,1000"]
    try:
        wait_http(f"{base}/health", 90)
        # a new browser opens the UI's front page, then the experiment's link in its list (no bench link involved)
        listed = dump_dom(chromium, flags, f"{base}/")
        (href,) = re.findall(rf'href="(#/experiments/\d+)">{exp.name}</a>', listed)
        opened = dump_dom(chromium, flags, f"{base}/{href}")
        (link,) = tracking.leaderboard_links(uri, base)
        board = dump_dom(chromium, flags, link.split(": ", 1)[1])
        runs = dump_dom(chromium, flags, f"{base}/#/experiments/{exp.experiment_id}/runs?{tracking.UI_QUERY}")
        table = dump_dom(chromium, flags, f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
                                          f"/artifacts/leaderboard/llm_pretrain_bf16.json?{tracking.UI_QUERY}")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # the server and its workers
        printed, _ = ui.communicate(timeout=30)
    assert href == f"#/experiments/{exp.experiment_id}"
    assert "Model registry" in opened and "Judges" not in opened  # the model-training view, not GenAI's Traces
    assert "Run Name" in opened and f">{parent.info.run_name}</span></a>" in opened  # its runs table: the suite's run
    assert "pick Views &gt; Leaderboard" in opened
    assert f"leaderboard of {link}" in printed  # `bench ui` says where the leaderboard is
    for page in (board, runs):
        assert "Model registry" in page and "Judges" not in page  # MLflow 3's model-training pages, not GenAI's
    assert "pick Views &gt; Leaderboard" in runs  # the experiment's description says how to open the leaderboard view
    for name in ("llm_pretrain_bf16 spam lr=0.001 seed=0", "llm_pretrain_bf16 adam lr=0.001 seed=1"):
        assert name in board
    assert "Group: bench.table" in board and "(average)" in board  # one group per table, label and lr
    assert "final.val_perplexity" in board and "bench.table" in board and "bench.optimizer" in board
    assert board.index("36") < board.index("41")  # spam's mean perplexity first: lower is better
    assert "36 ± 1.414" in table and "llama_60m (paper)" in table and "30.46" in table
