"""Evaluation: our exact perplexity and, beside it, the papers' estimator on the same batches."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tasks.llm_pretrain.model import build_llama, llama_config
from tasks.llm_pretrain.task import PAPER_ESTIMATE, CausalLMLoss, evaluate


def test_exact_loss_and_the_papers_estimator():
    torch.manual_seed(0)
    model = build_llama(llama_config("tiny", 101)).eval()
    gen = torch.Generator().manual_seed(2)
    batches = []
    for n_pad in (0, 5, 11, 3):
        ids = torch.randint(1, 101, (3, 24), generator=gen)
        labels = ids.clone()
        labels[0, 24 - n_pad:] = -100  # padded tail of one sequence
        batches.append((ids, labels))
    exact, paper = evaluate(CausalLMLoss(model), batches, torch.device("cpu"), contextlib.nullcontext)

    with torch.no_grad():
        losses = [model(input_ids=ids, labels=labels).loss.double() for ids, labels in batches]
        sums = [loss * int((labels[:, 1:] != -100).sum()) for loss, (_, labels) in zip(losses, batches, strict=True)]
    tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in batches)
    assert math.isclose(exact, float(sum(sums)) / tokens, rel_tol=1e-6)
    # The authors' loop: counter from 1, per-batch mean losses summed over n + 1 (SPAM torchrun_main.py:120-142).
    assert math.isclose(paper, float(sum(losses)) / (len(batches) + 1), rel_tol=1e-6)
    assert math.exp(paper) < math.exp(exact)


@pytest.mark.slow
def test_the_task_reports_both_perplexities(smoke_run):
    final = smoke_run.result
    n = len(smoke_run.ctx.series(PAPER_ESTIMATE))
    assert n == len(smoke_run.ctx.series("val_perplexity")) >= 1
    assert 1.0 < final[PAPER_ESTIMATE] < final["val_perplexity"]
