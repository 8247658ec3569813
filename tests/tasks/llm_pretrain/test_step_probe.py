"""The step probe is a GPU tool: without CUDA it says so and exits 2; its help names what it measures."""

from __future__ import annotations

import pytest
import torch

from tasks.llm_pretrain.step_probe import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_with_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["one", "--steps", "3"])
    assert info.value.code == 2 and "CUDA" in capsys.readouterr().err


def test_help_names_the_modes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "reduce-overhead" in out and "--processes" in out
