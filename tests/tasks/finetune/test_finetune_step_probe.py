"""The fine-tuning step probe is a GPU tool: without CUDA it says so and exits 2; processes' rates add up over the
span they share."""

from __future__ import annotations

import pytest
import torch

from tasks.finetune.step_probe import main, summed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_with_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["one", "--steps", "3"])
    assert info.value.code == 2 and "CUDA" in capsys.readouterr().err


def test_rates_add_up_over_the_shared_span():
    # two processes: 10/s for 0-10 s and 20/s for 5-10 s: 200 done in the 10 s span
    out = summed([(10.0, 0.0, 10.0), (20.0, 5.0, 10.0)])
    assert out == {"aggregate_per_s": 20.0, "span_s": 10.0, "mean_per_process": 15.0}
