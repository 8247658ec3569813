"""The training-throughput benchmark runs the real loop and reports tokens/s and MFU (CPU, tiny model)."""

from __future__ import annotations

import json

import pytest

from tasks.llm_pretrain.throughput import main

TINY = ["--size", "tiny", "--steps", "6", "--log-every", "2", "--device", "cpu", "--set", "batch_size=8",
        "--set", "micro_batch_size=4", "--set", "seq_len=64", "--set", "bpe_vocab_size=2048"]


def test_reports_tokens_per_second_and_mfu(tmp_path, capsys):
    rows = main([*TINY, "--variants", "eager", "--peak-tflops", "1", "--json", str(tmp_path / "t.json")])
    (row,) = rows
    assert row["tokens_per_sec"] > 0 and len(row["windows"]) == 2  # the first window (warm-up) is left out
    assert row["real_token_fraction"] == 1.0  # the offline text is packed: the full-batch rate is the real one
    assert row["positions_per_sec"] == row["tokens_per_sec"]
    assert row["mfu"] == pytest.approx(row["tokens_per_sec"] * row["flops_per_token"] / 1e12)
    assert row["flops_per_token"] > 6 * 0.3e6  # 6N with N of the tiny model, plus attention
    assert row["first_step_s"] > 0  # the first step's seconds (compilation, when compiled), in the table too
    out = capsys.readouterr().out
    assert "| tiny | eager | 4 |" in out and f"| {row['first_step_s']:.1f} s |" in out
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["meta"]["torch"] and saved["results"][0]["variant"] == "eager"


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit) as info:
        main([*TINY, "--variants", "turbo"])
    assert info.value.code == 2


def test_anchor_recipe_runs_beside_the_harness(capsys):
    rows = main([*TINY, "--variants", "eager,anchor", "--peak-tflops", "1"])
    assert [r["variant"] for r in rows] == ["eager", "anchor"]
    anchor = rows[1]
    assert anchor["tokens_per_sec"] > 0 and len(anchor["windows"]) == 6 and anchor["data_source"] == "random"
    assert anchor["flops_per_token"] == rows[0]["flops_per_token"]  # the same model shape, the same FLOP count
    assert "| tiny | anchor | 4 |" in capsys.readouterr().out


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--variants" in out and "anchor" in out and "compile-int4" in out
