"""`bench perf`: the benchmarks' own options reach `--help`, and the command without a benchmark says what it takes."""

from __future__ import annotations

import pytest

from tests.bench.test_cli_errors import run_cli


@pytest.mark.parametrize("what,options", [("optimizers", ["--names", "--check", "--size"]),
                                          ("train", ["--variants", "anchor", "--set"])])
def test_help_lists_the_benchmark_options(tmp_path, monkeypatch, capsys, what, options):
    code, out, _ = run_cli(["perf", what, "--help"], tmp_path, monkeypatch, capsys)
    assert code == 0
    assert f"bench perf {what}" in out
    for option in options:
        assert option in out


def test_perf_help_without_a_benchmark(tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(["perf", "--help"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "optimizers" in out and "train" in out
    code, _, _ = run_cli(["perf"], tmp_path, monkeypatch, capsys)
    assert code == 2
