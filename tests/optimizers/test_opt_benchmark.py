"""The optimizer step-time benchmark: options, the saved report, bad input (CPU, the smallest LLaMA size)."""

from __future__ import annotations

import json

import pytest

from optimizers.benchmark import main


@pytest.mark.slow
def test_report_is_saved_with_its_command(tmp_path):
    out = tmp_path / "opt.json"
    argv = ["--size", "60m", "--dtype", "bfloat16", "--device", "cpu", "--names", "adamw,spam", "--steps", "1",
            "--warmup", "0", "--json", str(out)]
    report = main(argv)
    saved = json.loads(out.read_text())
    assert saved["command"] == "bench perf optimizers " + " ".join(argv)
    (run,) = saved["runs"]
    assert list(run["results"]) == ["adamw", "spam"] and run["results"]["adamw"]["ratio"] == 1.0
    assert run["results"]["spam"]["fused_active"] is False  # CPU tensors: the foreach path
    assert report["torch"] == saved["torch"]


def test_unknown_size_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--size", "2b", "--device", "cpu"])
    assert info.value.code == 2
    assert "valid sizes: 60m, 130m, 350m, 1b" in capsys.readouterr().err


@pytest.mark.slow
def test_host_only_times_the_fused_step_on_the_cpu_and_restores_its_kernels():
    from optimizers import fused

    saved = fused._kernels, fused.device_supported, fused.triton_unavailable_reason
    report = main(["--size", "60m", "--dtype", "bfloat16", "--device", "cpu", "--names", "spam_fused,stable_spam_fused",
                   "--steps", "2", "--warmup", "1", "--host-only"])
    assert report["host_only"] is True
    (run,) = report["runs"]
    assert all(r["fused_active"] for r in run["results"].values())  # CPU tensors, yet the fused path ran
    assert (fused._kernels, fused.device_supported, fused.triton_unavailable_reason) == saved
