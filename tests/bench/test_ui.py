"""The MLflow UI as `bench ui` opens it, driven in headless Chromium: the model-training pages, also for an experiment
opened from the experiments list, whose first view is the leaderboard (trial runs named by table, label, lr and seed,
the table, optimizer and headline metric as columns), kept as the user changes it; the saved leaderboard view (grouped
by table and label, sorted by the headline metric) and the leaderboard tables of the parent run."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from bench import leaderboard, tracking
from bench.cli import experiment_name
from tests.bench.test_end_to_end import dump_dom, free_port, wait_http
from tests.bench.test_reports import fill_store

pytestmark = pytest.mark.slow


class Browser:
    """Headless Chromium driven through its DevTools pipe (it reads commands on fd 3, answers on fd 4): open a page,
    run a script in it, wait for what it shows, as a user's clicks would."""

    def __init__(self, chromium: str, flags: list[str]) -> None:
        commands, self.commands = os.pipe()
        self.answers, answers = os.pipe()
        # bash: dash redirects only file descriptors below 10
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{commands} 4>&{answers}', "bash", chromium, *flags,
                                      "--remote-debugging-pipe", "about:blank"], pass_fds=(commands, answers),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands)
        os.close(answers)
        self.buffer, self.last_id = b"", 0
        (page,) = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                if not select.select([self.answers], [], [], 60)[0]:
                    raise TimeoutError(method)
                chunk = os.read(self.answers, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.last_id:
                assert "error" not in answer, answer
                return answer["result"]

    def js(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                         awaitPromise=True)["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", self.session, url=url)

    def wait(self, expression: str, seconds: float = 60) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.js(f"!!({expression})"):
                return True
            time.sleep(0.5)
        return False

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


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
    names = ("llm_pretrain_bf16 spam lr=0.001 seed=0", "llm_pretrain_bf16 adam lr=0.001 seed=1")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "bench", "ui", "--port", str(port)], cwd=tmp_path,
                          env={**os.environ, "BENCH_HOME": str(tmp_path / ".bench")}, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1600,1000"]
    stored = f'MLflowLocalStorage-1.1-ExperimentPage-["{exp.experiment_id}"]-ReactComponentState'
    try:
        wait_http(f"{base}/health", 90)
        # a new browser opens the UI's front page and clicks the experiment in its list, nothing else
        browser = Browser(chromium, [*flags, f"--user-data-dir={tmp_path / 'fresh'}"])
        try:
            browser.open(f"{base}/")
            link = f'[...document.querySelectorAll("a")].find(a => a.textContent === {json.dumps(exp.name)})'
            assert browser.wait(link), "the experiments list shows the suite's experiment"
            href = browser.js(f"{link}.getAttribute('href')")
            browser.js(f"{link}.click()")
            shown = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in names)
            browser.wait(shown)
            opened = browser.js("document.documentElement.outerHTML")
            headers = browser.js('[...document.querySelectorAll(".ag-header-cell")].map(e => e.innerText.trim())')
            # what the user changes is kept: a reload of the front page leaves the page's record as it is
            change = json.dumps({"orderByKey": "attributes.start_time"})
            browser.js(f"localStorage.setItem({json.dumps(stored)}, {json.dumps(change)})")
            browser.open(f"{base}/")
            assert browser.wait(link)
            kept = browser.js(f"localStorage.getItem({json.dumps(stored)})")
        finally:
            browser.close()
        dump_flags = [*flags, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
        (link,) = tracking.leaderboard_links(uri, base)
        board = dump_dom(chromium, dump_flags, link.split(": ", 1)[1])
        runs = dump_dom(chromium, dump_flags, f"{base}/#/experiments/{exp.experiment_id}/runs?{tracking.UI_QUERY}")
        table = dump_dom(chromium, dump_flags, f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
                                               f"/artifacts/leaderboard/llm_pretrain_bf16.json?{tracking.UI_QUERY}")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # the server and its workers
        printed, _ = ui.communicate(timeout=30)
    assert href == f"#/experiments/{exp.experiment_id}"
    assert "Model registry" in opened and "Judges" not in opened  # the model-training view, not GenAI's Traces
    for name in names:  # the trials, not only the suite's parent run
        assert name in opened
    for column in ("bench.table", "bench.optimizer", "final.val_perplexity"):
        assert any(column in h for h in headers), headers
    assert kept == change
    assert f"leaderboard of {link}" in printed  # `bench ui` says where the leaderboard is
    for page in (board, runs):
        assert "Model registry" in page and "Judges" not in page  # MLflow 3's model-training pages, not GenAI's
    assert "Views &gt; Leaderboard" in runs  # the experiment's description says how to open the leaderboard view
    for name in names:
        assert name in board
    assert "Group: bench.table" in board and "(average)" in board  # one group per table, label and lr
    assert "final.val_perplexity" in board and "bench.table" in board and "bench.optimizer" in board
    assert board.index("36") < board.index("41")  # spam's mean perplexity first: lower is better
    assert "36 ± 1.414" in table and "llama_60m (paper)" in table and "30.46" in table
